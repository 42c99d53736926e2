"""``create_model`` / ``list_models``: timm's factory restricted to t2tvit's models, plus checkpoints."""
from typing import Any, Dict, List, Tuple

import timm
import torch.nn as nn
from timm.models import split_model_name_tag

from . import models  # noqa: F401  (list_models reads timm's registry, which importing the models fills)


def list_models(pattern: str = '') -> List[str]:
    """Names of every t2tvit model (optionally filtered by an fnmatch ``pattern``)."""
    import fnmatch
    names = timm.list_models(module=['t2t_vit', 'ablations'])  # natural order: t2t_vit_7 before t2t_vit_10
    return [n for n in names if not pattern or fnmatch.fnmatch(n, pattern)]


def create_model(name: str | None = None, checkpoint_path: str | None = None, pretrained: bool = False,
                 **kwargs) -> nn.Module:
    """Build a registered model; with ``checkpoint_path`` load any supported checkpoint layout, with
    ``pretrained=True`` the authors' released weights of a pretrained tag (``t2t_vit_14`` is
    ``t2t_vit_14.in1k``; ``t2t_vit_14.in1k_ft_cifar10`` names another), kept in torch hub's cache.

    With a checkpoint, arguments not given come from it: ``num_classes`` from its head (1000 for
    the reference releases), ``img_size`` from its position table, and for our own formats (a
    training checkpoint or a t2tvit safetensors file) everything, the model name included, so
    ``create_model(None, checkpoint_path='runs/demo/best.pth')`` rebuilds the trained model.
    EMA weights are loaded when the file has them (see :func:`t2tvit.checkpoint.load_checkpoint`).
    """
    arch, tag = split_model_name_tag(name) if name is not None else (None, '')
    if arch is not None and arch not in list_models():
        raise UnknownModelError(arch, list_models())
    if tag and name not in timm.list_pretrained(arch + '.*'):
        from .errors import UserError
        tags = ', '.join(timm.list_pretrained(arch + '.*')) or 'none'
        raise UserError(f'{name}: no such pretrained tag (tags of {arch}: {tags})')
    if pretrained and checkpoint_path:
        from .errors import UserError
        raise UserError('give pretrained=True (the released weights) or checkpoint_path=..., not both')
    ckpt = None
    if checkpoint_path:
        from .checkpoint import model_args_from_checkpoint, read_checkpoint
        ckpt = read_checkpoint(checkpoint_path)
        name, kwargs = model_args_from_checkpoint(ckpt, name, **kwargs)
    elif name is None:
        raise UnknownModelError('None', list_models())
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    # what save_model records, so that a saved file alone rebuilds this model
    model.t2tvit_config = {'model': split_model_name_tag(name)[0],
                           'model_kwargs': {k: v for k, v in kwargs.items() if v is not None}}
    if ckpt is not None:
        from .checkpoint import load_checkpoint
        load_checkpoint(model, ckpt)
    return model


def pretrained_tags(pattern: str = '') -> List[Dict[str, Any]]:
    """Every pretrained tag (optionally those matching an fnmatch ``pattern``): its release file, published
    top-1, classes, image size, URL, the path in torch hub's cache and whether the file is there."""
    import fnmatch
    import os
    from .checkpoint import pretrained_path
    from .models.t2t_vit import PRETRAINED
    rows = []
    for tag, release in PRETRAINED.items():
        if pattern and not fnmatch.fnmatch(tag, pattern):
            continue
        cfg = timm.models.get_pretrained_cfg(tag).to_dict()
        path = pretrained_path(cfg)
        rows.append({'tag': tag, 'file': release['file'], 'top1': release['top1'], 'dataset': release['dataset'],
                     'num_classes': cfg['num_classes'], 'img_size': cfg['input_size'][-1], 'url': cfg['url'],
                     'path': path, 'cached': os.path.isfile(path)})
    return rows


def pretrained_weights(name: str) -> Tuple[str, str]:
    """The released weights of ``name`` (a model, meaning its first tag, or ``model.tag``) as a local file,
    downloaded into torch hub's cache when missing: ``(path, 'model.tag')``."""
    from .checkpoint import fetch_pretrained
    from .errors import UserError
    arch, tag = split_model_name_tag(name)
    if arch not in list_models():
        raise UserError(str(UnknownModelError(arch, list_models())))
    tags = timm.list_pretrained(arch + '.*')
    full = f'{arch}.{tag}' if tag else (tags[0] if tags else arch)
    if full not in tags:
        known = ', '.join(tags) if tags else 'none; `t2tvit models --pretrained` lists the models that have'
        raise UserError(f'{name}: no released weights (pretrained tags of {arch}: {known})')
    return fetch_pretrained(timm.models.get_pretrained_cfg(full).to_dict()), full


class UnknownModelError(ValueError):
    def __init__(self, name: str, known: List[str]):
        import difflib
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else '; run `t2tvit models` for the list'
        super().__init__(f'unknown model {name!r}{hint}')
