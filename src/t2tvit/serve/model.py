"""The model a server answers with: weights, class names, preprocessing, and the explain pictures.

Everything here runs on the model's own thread (see batching.py); nothing imports the web stack.
"""
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..precision import InferencePrecision

OVERLAY_MIN_PX = 256  # small inputs (the 32 px digits) are enlarged so the overlay can be seen


@dataclass
class ServedModel:
    """``model`` (float32) draws the explain pictures; predictions run through the copy that ``precision``
    makes of it (weights cast or quantized once, the fast stem paths: ``t2tvit serve --dtype ...``)."""
    model: nn.Module
    name: str
    weights: str
    class_names: List[str]
    preprocessing: Dict[str, Any]
    transform: Callable
    precision: InferencePrecision = field(default_factory=InferencePrecision)
    device: str = 'cpu'

    def __post_init__(self):
        self._resize, self._normalise = _split_transform(self.transform)
        self.fast = self.precision.prepare(self.model, self.device, self.name)

    def preprocess(self, image) -> torch.Tensor:
        """An RGB PIL image -> (C, H, W) pixels, resized and cropped as the model was trained (uint8).

        Only PIL works here (on the request's thread); the float conversion and normalisation run
        batched on the model's thread (:meth:`normalise`), so no two threads run torch kernels at once.
        """
        return self._resize(image)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Batched (B, C, H, W) pixels from :meth:`preprocess` -> the normalised float input."""
        return self._normalise(x)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, classes) softmax, float32 on the CPU."""
        return self.precision.logits(self.fast, self.normalise(x.to(self.device))).softmax(dim=1).cpu()

    def warm_up(self, batch_sizes=(1, 2)) -> None:
        """Run blank batches, so that a compiled stem compiles (a static and a dynamic batch size) before the
        first request rather than during it."""
        size = self.preprocessing['img_size']
        for b in batch_sizes:
            self.probabilities(torch.zeros(b, 3, size, size, dtype=torch.uint8))

    def describe(self) -> Dict[str, Any]:
        return {'model': self.name, 'weights': self.weights, 'num_classes': len(self.class_names),
                'class_names': self.class_names,
                'input_size': [3, self.preprocessing['img_size'], self.preprocessing['img_size']],
                'preprocessing': self.preprocessing, **self.precision.as_json(),
                'precision': self.precision.describe(), 'device': self.device,
                't2t_stages': 't2t1' in _layer_names(self.model)}

    def _image(self, x: torch.Tensor) -> np.ndarray:
        """The input as the model saw it (resized and cropped): (H, W, 3) in [0, 1]."""
        if x.dtype == torch.uint8:
            return (x.float() / 255).permute(1, 2, 0).numpy()
        mean = torch.tensor(self.preprocessing['mean']).view(-1, 1, 1)
        std = torch.tensor(self.preprocessing['std']).view(-1, 1, 1)
        return (x.float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()

    def rollout_png(self, x: torch.Tensor) -> bytes:
        """The attention rollout through every block over the input, as a PNG (t2tvit visualize attention's)."""
        from matplotlib import colormaps
        from PIL import Image

        from ..analysis.visualize import block_attention
        _, rollout, _ = block_attention(self.model, self.normalise(x[None].to(self.device)), [])
        image = self._image(x)
        h, w = image.shape[:2]
        r = F.interpolate(rollout[None, None].float().cpu(), size=(h, w), mode='bilinear', align_corners=False)[0, 0]
        r = ((r - r.min()) / (r.max() - r.min()) if r.max() > r.min() else torch.zeros_like(r)).numpy()
        heat = colormaps['inferno'](r)[..., :3]
        blend = (0.45 * image + 0.55 * heat).clip(0, 1)
        out = Image.fromarray((blend * 255).round().astype(np.uint8))
        scale = max(1, -(-OVERLAY_MIN_PX // max(h, w)))
        if scale > 1:
            out = out.resize((w * scale, h * scale), Image.NEAREST)
        buf = io.BytesIO()
        out.save(buf, format='PNG')
        return buf.getvalue()

    def features_png(self, x: torch.Tensor) -> bytes:
        """The two T2T stages' feature maps (the paper's Fig. 2 view, t2tvit visualize features's picture)."""
        from ..analysis.visualize import feature_layers, render_features
        if 't2t1' not in _layer_names(self.model):
            raise UserError(f'{self.name} has no T2T stages to show')
        maps = feature_layers(self.model, self.normalise(x[None].to(self.device)), ['t2t1', 't2t2'])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / 'features.png'
            render_features(maps, path, 16, f'{self.name}: T2T stages, input {x.shape[-2]}x{x.shape[-1]}')
            return path.read_bytes()


def _split_transform(transform) -> Tuple[Callable, Callable]:
    """timm's eval transform (resize, crop, to tensor, normalise) as a PIL part and a batched tensor part.

    ``to_tensor`` of a uint8 image is ``x.float() / 255``, so the batched part gives the same numbers. A
    transform of another shape runs whole on the request's thread, and the batched part is the identity.
    """
    steps = list(getattr(transform, 'transforms', []))
    if len(steps) < 2 or type(steps[-2]).__name__ not in ('ToTensor', 'MaybeToTensor') \
            or type(steps[-1]).__name__ != 'Normalize':
        return transform, lambda x: x
    from torchvision.transforms import Compose
    resize, normalize = Compose(steps[:-2]), steps[-1]

    def pixels(image) -> torch.Tensor:
        return torch.from_numpy(np.array(resize(image).convert('RGB'), dtype=np.uint8)).permute(2, 0, 1)

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return normalize(x.float().div(255)) if x.dtype == torch.uint8 else x
    return pixels, normalise


def _layer_names(model: nn.Module) -> Dict[str, int]:
    from ..analysis.visualize import layer_names
    return layer_names(model) if hasattr(model, 'feature_info') else {}


def load_served_model(name: Optional[str], checkpoint: Optional[str] = None, pretrained: bool = False,
                      precision: Optional[InferencePrecision] = None, device: Optional[str] = None) -> ServedModel:
    """The model of ``--model`` with ``--checkpoint`` or ``--pretrained`` weights, in eval mode, predicting
    in ``precision`` (default float32)."""
    from ..engine.builders import model_for_checkpoint
    from ..factory import pretrained_weights
    precision = precision or InferencePrecision()
    dev = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    precision.check(dev)
    if pretrained:
        if not name:
            raise UserError('--pretrained needs --model NAME or NAME.TAG (`t2tvit models --pretrained` lists them)')
        checkpoint, name = pretrained_weights(name)  # the tag carries its preprocessing and class names
    if not checkpoint:
        raise UserError('serve needs --checkpoint PATH or --pretrained')
    if not os.path.isfile(checkpoint):
        raise UserError(f'{checkpoint}: no such checkpoint file (check the path)')
    model, ckpt, name = model_for_checkpoint(name, checkpoint)
    model.eval()
    pre, class_names, transform = _inputs_and_classes(model, ckpt)
    model.to(dev)
    weights = 'pretrained ' + name if pretrained else Path(checkpoint).name
    return ServedModel(model, name, weights, class_names, pre, transform, precision, dev)


def _inputs_and_classes(model: nn.Module, ckpt):
    """Preprocessing and class names as ``t2tvit predict`` resolves them (a training run's own mean/std and
    classes, else the model's pretrained_cfg, ImageNet's names for 1000 classes)."""
    from .. import data as D
    from ..engine.evaluate import checkpoint_class_names
    run = ckpt.run_config or {}
    pre = D.resolve_preprocessing(model, {k: run.get(k) for k in ('mean', 'std', 'crop_pct', 'interpolation')})
    names = checkpoint_class_names(model, ckpt, descriptions=True) or [str(i) for i in range(model.num_classes)]
    pre = {'img_size': pre['img_size'], 'mean': list(pre['mean']), 'std': list(pre['std']),
           'crop_pct': pre['crop_pct'], 'interpolation': pre['interpolation']}
    transform = D.eval_transform(pre['img_size'], pre['mean'], pre['std'], pre['crop_pct'], pre['interpolation'])
    return pre, list(names), transform
