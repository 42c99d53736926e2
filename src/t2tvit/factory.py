"""``create_model`` / ``list_models``: timm's factory restricted to t2tvit's models, and the one place where a
checkpoint becomes a model (:func:`create_model` with ``checkpoint_path``, :func:`model_from_checkpoint`)."""
import fnmatch
import os
from typing import Any, Dict, List, Tuple

import timm
import torch.nn as nn
from timm.models import split_model_name_tag

from . import models  # noqa: F401  (list_models reads the registry, which importing the models fills)
from .checkpoint import Checkpoint, fetch_pretrained, load_checkpoint, model_args_from_checkpoint, pretrained_path
from .checkpoint import read_checkpoint
from .errors import UserError
from .models.t2t_vit import release_info
from .registry import UnknownModelError, list_models, model_entry

__all__ = ['UnknownModelError', 'create_model', 'create_model_from_checkpoint', 'list_models',
           'model_from_checkpoint', 'pretrained_tags', 'pretrained_weights']


def _check_name(name: str | None) -> None:
    arch, tag = split_model_name_tag(name) if name is not None else (None, '')
    if arch is not None and arch not in list_models():
        raise UnknownModelError(arch, list_models())
    if tag and name not in timm.list_pretrained(arch + '.*'):
        tags = ', '.join(timm.list_pretrained(arch + '.*')) or 'none'
        raise UserError(f'{name}: no such pretrained tag (tags of {arch}: {tags})')


def _build(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    # what save_model records, so that a saved file alone rebuilds this model
    model.t2tvit_config = {'model': split_model_name_tag(name)[0],
                           'model_kwargs': {k: v for k, v in kwargs.items() if v is not None}}
    return model


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
    _check_name(name)
    if pretrained and checkpoint_path:
        raise UserError('give pretrained=True (the released weights) or checkpoint_path=..., not both')
    if checkpoint_path:
        return model_from_checkpoint(read_checkpoint(checkpoint_path), name, **kwargs)
    if name is None:
        raise UnknownModelError('None', list_models())
    return _build(name, pretrained=pretrained, **kwargs)


def model_from_checkpoint(ckpt: Checkpoint, name: str | None = None, *, load: bool = True,
                          new_head: bool = False, **kwargs) -> nn.Module:
    """The model ``ckpt`` (already read, e.g. once for a resume) describes, with its weights.

    ``name`` and ``kwargs`` override what the checkpoint says (``img_size=384`` resizes the position
    table, ``num_classes=10`` gives a new head; ``new_head=True`` says that is expected, as in
    fine-tuning, so no warning). ``load=False`` builds the model without loading (a resumed run
    restores its own weights).
    """
    _check_name(name)
    name, kwargs = model_args_from_checkpoint(ckpt, name, **kwargs)
    model = _build(name, **kwargs)
    if load:
        load_checkpoint(model, ckpt, new_head=new_head)
    return model


def create_model_from_checkpoint(path: str | os.PathLike, name: str | None = None, **kwargs) -> nn.Module:
    """The model a checkpoint file describes, with its weights: ``create_model(name, checkpoint_path=path)``.

    Files in our formats name their model, so ``name`` may be left out; ``kwargs`` override the
    checkpoint's arguments (``img_size=384`` resizes the position table, ``num_classes=10`` gives a
    new head).
    """
    return create_model(name, checkpoint_path=path, **kwargs)


def pretrained_tags(pattern: str = '') -> List[Dict[str, Any]]:
    """Every pretrained tag (optionally those matching an fnmatch ``pattern``): its release file, published
    top-1, classes, image size, URL, the path in torch hub's cache and whether the file is there."""
    rows = []
    for name in list_models():
        entry = model_entry(name)
        for tag in entry.pretrained:
            full = f'{name}.{tag}'
            if pattern and not fnmatch.fnmatch(full, pattern):
                continue
            release = release_info(entry, tag)
            cfg = timm.models.get_pretrained_cfg(full).to_dict()
            path = pretrained_path(cfg)
            rows.append({'tag': full, 'file': release['file'], 'top1': release['top1'],
                         'dataset': release['dataset'], 'num_classes': cfg['num_classes'],
                         'img_size': cfg['input_size'][-1], 'url': cfg['url'], 'path': path,
                         'cached': os.path.isfile(path)})
    return rows


def pretrained_weights(name: str) -> Tuple[str, str]:
    """The released weights of ``name`` (a model, meaning its first tag, or ``model.tag``) as a local file,
    downloaded into torch hub's cache when missing: ``(path, 'model.tag')``."""
    arch, tag = split_model_name_tag(name)
    if arch not in list_models():
        raise UserError(str(UnknownModelError(arch, list_models())))
    tags = timm.list_pretrained(arch + '.*')
    full = f'{arch}.{tag}' if tag else (tags[0] if tags else arch)
    if full not in tags:
        known = ', '.join(tags) if tags else 'none; `t2tvit models --pretrained` lists the models that have'
        raise UserError(f'{name}: no released weights (pretrained tags of {arch}: {known})')
    return fetch_pretrained(timm.models.get_pretrained_cfg(full).to_dict()), full
