"""``create_model`` / ``list_models``: timm's factory restricted to t2tvit's models, plus checkpoints."""
from typing import List

import timm
import torch.nn as nn

from . import models  # noqa: F401  (list_models reads timm's registry, which importing the models fills)


def list_models(pattern: str = '') -> List[str]:
    """Names of every t2tvit model (optionally filtered by an fnmatch ``pattern``)."""
    import fnmatch
    names = timm.list_models(module=['t2t_vit', 'ablations'])  # natural order: t2t_vit_7 before t2t_vit_10
    return [n for n in names if not pattern or fnmatch.fnmatch(n, pattern)]


def create_model(name: str | None = None, checkpoint_path: str | None = None, **kwargs) -> nn.Module:
    """Build a registered model; with ``checkpoint_path`` load any supported checkpoint layout.

    With a checkpoint, arguments not given come from it: ``num_classes`` from its head (1000 for
    the reference releases), ``img_size`` from its position table, and for our own formats (a
    training checkpoint or a t2tvit safetensors file) everything, the model name included, so
    ``create_model(None, checkpoint_path='runs/demo/best.pth')`` rebuilds the trained model.
    EMA weights are loaded when the file has them (see :func:`t2tvit.checkpoint.load_checkpoint`).
    """
    if name is not None and name not in list_models():
        raise UnknownModelError(name, list_models())
    ckpt = None
    if checkpoint_path:
        from .checkpoint import model_args_from_checkpoint, read_checkpoint
        ckpt = read_checkpoint(checkpoint_path)
        name, kwargs = model_args_from_checkpoint(ckpt, name, **kwargs)
    elif name is None:
        raise UnknownModelError('None', list_models())
    model = timm.create_model(name, **kwargs)
    # what save_model records, so that a saved file alone rebuilds this model
    model.t2tvit_config = {'model': name, 'model_kwargs': {k: v for k, v in kwargs.items() if v is not None}}
    if ckpt is not None:
        from .checkpoint import load_checkpoint
        load_checkpoint(model, ckpt)
    return model


class UnknownModelError(ValueError):
    def __init__(self, name: str, known: List[str]):
        import difflib
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else '; run `t2tvit models` for the list'
        super().__init__(f'unknown model {name!r}{hint}')
