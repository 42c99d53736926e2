"""Writing weights that rebuild their model: our safetensors format, and conversion between layouts.

Both check the weights against the model they claim first (built on the meta device), so a file
written here always loads strictly into the model its metadata names.
"""
import json
import os
from typing import Any

import timm
from torch import nn

from .fit import BUILD_ERRORS, differences, kwargs_text, looks_like, meta_model, model_args_from_checkpoint, signature
from .io import CheckpointError, PathLike, StateDict, atomic_write, portable
from .layouts import T2TVIT_FORMAT, T2TVIT_FORMAT_VERSION, json_kwargs, read_checkpoint, save_reference

__all__ = ['CONVERT_TARGETS', 'convert_checkpoint', 'save_model']

CONVERT_TARGETS = ('reference', 't2tvit', 'hf')


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _model_config(model: nn.Module, model_name: str | None, model_kwargs: dict[str, Any] | None
                  ) -> tuple[str, dict[str, Any]]:
    recorded = getattr(model, 't2tvit_config', None) or {}
    name = model_name or recorded.get('model') or (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    if not name:
        raise CheckpointError('the model does not say which registered model it is: pass model_name=...')
    kwargs = dict(recorded.get('model_kwargs') or {}) if model_kwargs is None else dict(model_kwargs)
    img_size = getattr(model, 'img_size', None)
    if img_size is not None:
        kwargs['img_size'] = img_size[0] if img_size[0] == img_size[1] else list(img_size)
    if getattr(model, 'num_classes', None) is not None:
        kwargs['num_classes'] = int(model.num_classes)
    return name, json_kwargs(kwargs)


def _write_t2tvit(path: PathLike, state_dict: StateDict, model_name: str, model_kwargs: dict[str, Any],
                  class_names: list[str] | None = None, weights: str = 'model') -> str:
    from safetensors.torch import save as st_save
    try:
        expected = signature(model_name, model_kwargs)
    except BUILD_ERRORS as e:
        raise CheckpointError(f'cannot build {model_name}({kwargs_text(model_kwargs)}) to check the weights: '
                              f'{_first_line(e)}') from None
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if got != expected:
        raise CheckpointError(f'the weights do not fit {model_name}({kwargs_text(model_kwargs)}): '
                              f'{differences(got, expected)}; pass the model arguments it was built with')
    metadata = {
        'format': T2TVIT_FORMAT,
        'format_version': str(T2TVIT_FORMAT_VERSION),
        'config': json.dumps({'model': model_name, 'model_kwargs': json_kwargs(model_kwargs)}),
        'weights': weights,
    }
    if class_names is not None:
        metadata['class_names'] = json.dumps(list(class_names))
    data = st_save(portable(state_dict), metadata=metadata)
    return atomic_write(path, lambda f: f.write(data))


def save_model(model: nn.Module, path: PathLike, class_names: list[str] | None = None,
               model_name: str | None = None, model_kwargs: dict[str, Any] | None = None) -> str:
    """Write ``model``'s weights in t2tvit's safetensors format, its config in the metadata.

    The name and constructor arguments are the ones :func:`t2tvit.create_model` recorded (its
    ``img_size`` and ``num_classes`` always), unless given; the file is checked to rebuild a model
    of the same keys and shapes. ``create_model_from_checkpoint(path)`` recreates the model.
    """
    name, kwargs = _model_config(model, model_name, model_kwargs)
    return _write_t2tvit(path, model.state_dict(), name, kwargs, class_names)


def _write_hf(folder: PathLike, state_dict: StateDict, name: str, kwargs: dict[str, Any],
              class_names: list[str] | None) -> str:
    """timm's own hub export (``save_for_hf``) of the model with these weights: config.json + model.safetensors."""
    from timm.models import save_for_hf
    folder = os.fspath(folder)
    if os.path.isfile(folder):
        raise CheckpointError(f'{folder}: is a file; --to hf writes a folder (config.json, model.safetensors)')
    model = timm.create_model(name, **kwargs)
    model.load_state_dict(state_dict, strict=True)
    labels = {'label_names': list(class_names)} if class_names and len(class_names) == model.num_classes else {}
    save_for_hf(model, folder, model_config=labels, safe_serialization=True)
    return folder


def convert_checkpoint(src: PathLike, dst: PathLike, to: str = 'reference', model_name: str | None = None,
                       use_ema: bool = True) -> dict[str, Any]:
    """Rewrite any readable checkpoint as a reference ``.pth.tar``, our safetensors file, or a Hugging Face folder.

    The weights are checked against the model first (``model_name``, else the one the file names);
    nothing is resized or re-initialised. ``to='reference'`` writes ``state_dict`` and, when the
    file has EMA weights, ``state_dict_ema``; ``to='t2tvit'`` and ``to='hf'`` write one set of weights
    (EMA unless ``use_ema=False``). ``to='hf'`` makes ``dst`` a folder as timm's hub export writes it
    (``config.json`` + ``model.safetensors``, what ``timm.models.push_to_hf_hub`` uploads), which
    ``timm.create_model('local-dir:DST', pretrained=True)`` rebuilds; a pretrained tag as ``model_name``
    (``t2t_vit_14.in1k_ft_cifar10``) brings its preprocessing and class names. Returns ``{'path', 'model',
    'model_kwargs', 'weights', 'layout'}`` (layout: the input's).
    """
    if to not in CONVERT_TARGETS:
        raise CheckpointError(f"--to {to}: expected one of {', '.join(CONVERT_TARGETS)}")
    ckpt = read_checkpoint(src)
    name, kwargs = model_args_from_checkpoint(ckpt, model_name)
    try:
        model = meta_model(name, kwargs)
    except BUILD_ERRORS as e:
        raise CheckpointError(f'{src}: cannot build {name}({kwargs_text(kwargs)}): {_first_line(e)}') from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def fitted(sd: StateDict, which: str) -> StateDict:
        got = {k: tuple(v.shape) for k, v in sd.items()}
        if got != want:
            raise CheckpointError(f'{src} ({which} weights) does not fit {name}: {differences(got, want)}; '
                                  f'{looks_like(sd)}')
        return {k: sd[k] for k in want}

    arch = name.split('.')[0]  # a pretrained tag names the model and brings its class names
    labels = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')
    class_names = ckpt.class_names or (list(labels) if labels and len(labels) == model.num_classes else None)
    if to == 'reference':
        raw = fitted(ckpt.weights, 'raw')
        ema = fitted(ckpt.ema, 'EMA') if ckpt.ema is not None else None
        save_reference(dst, raw, ema, arch=arch, epoch=ckpt.epoch)
        weights = 'state_dict + state_dict_ema' if ema is not None else 'state_dict'
    else:
        chosen = 'ema' if ckpt.uses_ema(use_ema) else 'model'
        sd = fitted(ckpt.state_dict(use_ema), chosen)
        if to == 'hf':
            _write_hf(dst, sd, name, kwargs, class_names)
        else:
            _write_t2tvit(dst, sd, arch, kwargs, class_names, weights=chosen)
        weights = 'EMA weights' if chosen == 'ema' else 'weights'
    return {'path': os.fspath(dst), 'model': name, 'model_kwargs': kwargs, 'weights': weights, 'layout': ckpt.layout}
