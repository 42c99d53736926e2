"""Every checkpoint layout t2tvit meets, each read into the reference key layout by its own small function.

Like timm's ``checkpoint_filter_fn`` beside each model, a layout is one function ``(path, object) ->
Checkpoint | None`` (None: not this layout), tried in turn on what :func:`~t2tvit.checkpoint.io.load_file`
read; the key conversions are pure ``state_dict -> state_dict`` functions.

- ``train``: the training engine's ``last.pth`` / ``best.pth`` (``TRAIN_FORMAT``): a dict with
  ``format``, ``version``, ``model``, ``ema`` (or None), optimizer/scheduler/scaler/RNG states,
  ``epoch``, ``step``, ``config`` (the run's config: ``model``, ``model_kwargs``, data, preprocessing)
  and ``class_names``.
- ``t2tvit``: our release format, a safetensors file whose metadata carries the model's name and
  constructor arguments, so that the file alone recreates its model.
- ``reference``: the authors' ``.pth.tar`` releases, written by timm's CheckpointSaver:
  ``state_dict`` (keys with DistributedDataParallel's ``module.`` prefix) and ``state_dict_ema``.
- ``cifar``: the reference's CIFAR transfer files, ``{'net': {'module.<key>': tensor}, ...}``.
- ``plain``: a bare state dict (``torch.save(model.state_dict())``, a safetensors file, or the
  ``{'model': state_dict}`` of DeiT's and timm's training scripts).
- ``passl``: PaddlePaddle PASSL ``.pdparams``: a pickled dict of numpy arrays, keys ``backbone.<key>``
  and ``head.fc_cls.*``, Linear weights stored (in, out). Read without paddle.

Where a checkpoint holds both raw and EMA weights, the EMA weights are used by default, as the
reference evaluation does, except in a training checkpoint whose ``kept`` says the raw weights
validated better (an EMA still near its start on a short run).
"""
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .io import FORMATS_HINT, CheckpointError, PathLike, StateDict, atomic_save, corrupt, load_file, portable

__all__ = ['T2TVIT_FORMAT', 'T2TVIT_FORMAT_VERSION', 'TRAIN_FORMAT', 'TRAIN_FORMAT_VERSION', 'Checkpoint',
           'passl_to_reference', 'read_checkpoint', 'save_reference', 'strip_prefixes']

# the training engine writes ``{'format': TRAIN_FORMAT, 'version': TRAIN_FORMAT_VERSION, ...}``
TRAIN_FORMAT = 't2tvit-train'
TRAIN_FORMAT_VERSION = 1
# safetensors metadata ``format`` / ``format_version`` of our release files
T2TVIT_FORMAT = 't2tvit'
T2TVIT_FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """The weights of a checkpoint file in the reference key layout, and what the file says about its model."""

    path: str
    layout: str  # 'train', 't2tvit', 'reference', 'cifar', 'plain' or 'passl'
    weights: StateDict  # the raw (non-EMA) state dict
    ema: StateDict | None = None
    model_name: str | None = None  # from our formats' config
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    epoch: int | None = None
    release_arch: str | None = None  # the reference releases' ``arch`` (e.g. 'T2t_vit_7'): a hint only
    run_config: dict[str, Any] = field(default_factory=dict)  # a training checkpoint's run config, else {}
    # a training checkpoint's 'kept': 'model' when the raw weights validated better than the EMA at its epoch
    kept: str | None = None

    def uses_ema(self, use_ema: bool = True) -> bool:
        """Whether ``state_dict(use_ema)`` gives the EMA: it is there, asked for, and not worse than the model."""
        return use_ema and self.ema is not None and self.kept != 'model'

    def state_dict(self, use_ema: bool = True) -> StateDict:
        return self.ema if self.uses_ema(use_ema) else self.weights

    @property
    def num_classes(self) -> int | None:
        """Classes of the checkpoint's head (our formats: their config), None when it has no head."""
        if 'num_classes' in self.model_kwargs:
            return int(self.model_kwargs['num_classes'])
        head = self.weights.get('head.weight')
        return int(head.shape[0]) if head is not None and head.ndim == 2 else None


# -- key conversions: pure state_dict -> state_dict ----------------------------------------------------------
def strip_prefixes(state_dict: StateDict) -> StateDict:
    """Drop DistributedDataParallel's ``module.`` and ``torch.compile``'s ``_orig_mod.`` from every key."""
    out: StateDict = {}
    for k, v in state_dict.items():
        for prefix in ('module.', '_orig_mod.'):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def passl_to_reference(state_dict: StateDict, linear_weights: set | None = None) -> StateDict:
    """PASSL keys and Linear layout to the reference's: a pure ``state_dict -> state_dict``.

    ``backbone.<key>`` becomes ``<key>``, ``head.fc_cls.*`` becomes ``head.*``, and Paddle's (in, out)
    Linear weights become (out, in). Which tensors are Linear weights is decided by name, never by
    shape (T2T-ViT has square Linear weights, and the Performer's ``w`` is a 2-D non-Linear
    tensor): ``linear_weights`` when given, else every 2-D ``*.weight`` (in T2T-ViT and its ablations
    these are exactly the ``nn.Linear`` weights: convolutions are 3-D/4-D, norms 1-D).
    """
    out: StateDict = {}
    for k, v in state_dict.items():
        if k.startswith('backbone.'):
            k = k[len('backbone.'):]
        elif k.startswith('head.fc_cls.'):
            k = 'head.' + k[len('head.fc_cls.'):]
        is_linear = k in linear_weights if linear_weights is not None else (k.endswith('.weight') and v.ndim == 2)
        out[k] = v.t().contiguous() if is_linear else v
    return out


def json_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments as JSON can hold them (tuples as lists); callables are left out."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, tuple):
            v = list(v)
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue  # callables (norm_layer, block_fn) cannot be recorded; the model's table supplies them
        out[k] = v
    return out


def kwargs_from_json(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


# -- one reader per layout --------------------------------------------------------------------------------
def _tensors(path: str, obj: Any, what: str) -> StateDict:
    is_tensor_dict = isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    if not is_tensor_dict:
        raise CheckpointError(f'{path}: {what} is not a state dict of tensors; give {FORMATS_HINT}')
    return strip_prefixes(obj)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _train(path: str, obj: dict) -> Checkpoint | None:
    if obj.get('format') != TRAIN_FORMAT:
        return None
    version = int(obj.get('version', 1))
    if version > TRAIN_FORMAT_VERSION:
        raise CheckpointError(f'{path}: written by a newer t2tvit (training format version {version}); '
                              'upgrade t2tvit')
    config = dict(obj.get('config') or {})
    ema = obj.get('ema')
    return Checkpoint(path, 'train', _tensors(path, obj.get('model'), "its 'model'"),
                      ema=_tensors(path, ema, "its 'ema'") if ema is not None else None,
                      model_name=config.get('model'), model_kwargs=dict(config.get('model_kwargs') or {}),
                      class_names=obj.get('class_names'), epoch=obj.get('epoch'), run_config=config,
                      kept=obj.get('kept') if obj.get('kept') in ('model', 'ema') else None)


def _reference(path: str, obj: dict) -> Checkpoint | None:
    if 'state_dict' not in obj and 'state_dict_ema' not in obj:
        return None
    raw, ema = obj.get('state_dict'), obj.get('state_dict_ema')
    weights = _tensors(path, raw if raw is not None else ema, "its 'state_dict'")
    arch = obj.get('arch') if isinstance(obj.get('arch'), str) else None
    return Checkpoint(path, 'reference', weights, ema=_tensors(path, ema, "its 'state_dict_ema'") if ema else None,
                      epoch=_int_or_none(obj.get('epoch')), release_arch=arch)


def _cifar(path: str, obj: dict) -> Checkpoint | None:
    if not isinstance(obj.get('net'), dict):
        return None
    return Checkpoint(path, 'cifar', _tensors(path, obj['net'], "its 'net'"), epoch=_int_or_none(obj.get('epoch')))


def _training_script(path: str, obj: dict) -> Checkpoint | None:
    """DeiT's and timm's training scripts: ``{'model': state_dict, ...}``."""
    if not isinstance(obj.get('model'), dict):
        return None
    return Checkpoint(path, 'plain', _tensors(path, obj['model'], "its 'model'"))


def _passl(path: str, obj: dict) -> Checkpoint | None:
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not any(isinstance(k, str) and k.startswith(('backbone.', 'head.fc_cls.')) for k in tensors):
        return None
    return Checkpoint(path, 'passl', passl_to_reference(tensors))


def _plain(path: str, obj: dict) -> Checkpoint | None:
    if not (obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        return None
    return Checkpoint(path, 'plain', strip_prefixes(obj))


# tried in this order: the first that recognises the object reads it
_LAYOUTS: tuple[Callable[[str, dict], Checkpoint | None], ...] = (
    _train, _reference, _cifar, _training_script, _passl, _plain)


def _pickled(path: str, obj: Any) -> Checkpoint:
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path}: holds a {type(obj).__name__}, not model weights; give {FORMATS_HINT}')
    for layout in _LAYOUTS:
        ckpt = layout(path, obj)
        if ckpt is not None:
            return ckpt
    keys = ', '.join(repr(k) for k in list(obj)[:5])
    raise CheckpointError(f'{path}: not a model checkpoint (a dict of {keys}{", ..." if len(obj) > 5 else ""}); '
                          f'expected a state dict or a dict with state_dict/net/model, in {FORMATS_HINT}')


def _safetensors(path: str, sd: StateDict, metadata: dict[str, str]) -> Checkpoint:
    if metadata.get('format') != T2TVIT_FORMAT:
        return Checkpoint(path, 'plain', strip_prefixes(sd))
    version = int(metadata.get('format_version', 1))
    if version > T2TVIT_FORMAT_VERSION:
        raise CheckpointError(f'{path}: written by a newer t2tvit (format version {version}); upgrade t2tvit')
    try:
        config = json.loads(metadata.get('config') or '{}')
        class_names = json.loads(metadata['class_names']) if 'class_names' in metadata else None
    except json.JSONDecodeError as e:
        raise corrupt(path, e) from None
    return Checkpoint(path, 't2tvit', sd, model_name=config.get('model'),
                      model_kwargs=kwargs_from_json(config.get('model_kwargs') or {}), class_names=class_names)


def read_checkpoint(path: PathLike) -> Checkpoint:
    """Read any supported checkpoint file into a :class:`Checkpoint` (reference key layout, on the CPU)."""
    path = os.fspath(path)
    kind, obj = load_file(path)
    if kind == 'safetensors':
        return _safetensors(path, *obj)
    return _pickled(path, obj)


# -- writing the reference layout -------------------------------------------------------------------------
def save_reference(path: PathLike, state_dict: StateDict, ema: StateDict | None = None,
                   arch: str | None = None, epoch: int | None = None) -> str:
    """A ``.pth.tar`` the reference code loads: ``state_dict`` (and ``state_dict_ema``), no ``module.`` prefix."""
    obj: dict[str, Any] = {'state_dict': portable(state_dict)}
    if ema is not None:
        obj['state_dict_ema'] = portable(ema)
    if arch is not None:
        obj['arch'] = arch
    if epoch is not None:
        obj['epoch'] = int(epoch)
    return atomic_save(obj, path)
