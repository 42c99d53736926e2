"""Checkpoints: reading every layout t2tvit meets, fitting weights to a model, writing ours.

Layouts read (told apart by the file's content, not its name):

- ``train``: the training engine's ``last.pth`` / ``best.pth`` (``TRAIN_FORMAT``): a dict with
  ``format``, ``version``, ``model``, ``ema`` (or None), optimizer/scheduler/scaler/RNG states,
  ``epoch``, ``step``, ``config`` (``{'model': name, 'model_kwargs': {...}}``) and ``class_names``.
- ``t2tvit``: our release format, a safetensors file whose metadata carries the model's name and
  constructor arguments, so that the file alone recreates its model (:func:`create_model_from_checkpoint`).
- ``reference``: the authors' ``.pth.tar`` releases, written by timm's CheckpointSaver:
  ``state_dict`` (keys with DistributedDataParallel's ``module.`` prefix) and ``state_dict_ema``.
- ``cifar``: the reference's CIFAR transfer files, ``{'net': {'module.<key>': tensor}, ...}``.
- ``plain``: a bare state dict (``torch.save(model.state_dict())`` or a safetensors file).
- ``passl``: PaddlePaddle PASSL ``.pdparams``: a pickled dict of numpy arrays, keys ``backbone.<key>``
  and ``head.fc_cls.*``, Linear weights stored (in, out). Read without paddle.

Where a checkpoint holds both raw and EMA weights, the EMA weights are used by default, as the
reference evaluation does. Nothing is unpickled beyond tensors and plain values: PyTorch files go
through ``torch.load(weights_only=True)``, PASSL files through an unpickler that can only rebuild
numpy arrays; a file that needs anything else is refused.

Fitting a state dict to a model (:func:`load_checkpoint`) keeps the reference key names, so only
two things may differ from the model: the classifier (another ``num_classes``: the head keeps its
fresh initialisation and a warning says so) and the position table (another image size: resized
bicubically like the reference transfer code, or regenerated as the exact sinusoid table, after
the model's ``pos_embed_resize``). Anything else fails with a :class:`CheckpointError` that lists
the first differences and names the registered model the checkpoint looks like.
"""
import argparse
import io
import json
import logging
import math
import os
import pickle
import re
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .layers.pos_table import resize_pos_table

__all__ = [
    'T2TVIT_FORMAT',
    'T2TVIT_FORMAT_VERSION',
    'TRAIN_FORMAT',
    'TRAIN_FORMAT_VERSION',
    'Checkpoint',
    'CheckpointError',
    'atomic_save',
    'closest_models',
    'convert_checkpoint',
    'create_model_from_checkpoint',
    'fetch_pretrained',
    'load_checkpoint',
    'model_args_from_checkpoint',
    'passl_to_reference',
    'pretrained_path',
    'read_checkpoint',
    'save_model',
    'save_reference',
    'strip_prefixes',
]

_logger = logging.getLogger(__name__)

# the training engine writes ``{'format': TRAIN_FORMAT, 'version': TRAIN_FORMAT_VERSION, ...}``
TRAIN_FORMAT = 't2tvit-train'
TRAIN_FORMAT_VERSION = 1
# safetensors metadata ``format`` / ``format_version`` of our release files
T2TVIT_FORMAT = 't2tvit'
T2TVIT_FORMAT_VERSION = 1

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike

_FORMATS_HINT = 'a PyTorch .pth/.pth.tar, a .safetensors or a PaddlePaddle .pdparams file'


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or does not fit the model: the message says which and how to fix it."""


@dataclass
class Checkpoint:
    """The weights of a checkpoint file in the reference key layout, and what the file says about its model."""

    path: str
    layout: str  # 'train', 't2tvit', 'reference', 'cifar', 'plain' or 'passl'
    model: StateDict
    ema: StateDict | None = None
    model_name: str | None = None  # from our formats' config
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    epoch: int | None = None
    arch: str | None = None  # the reference releases' ``arch`` (e.g. 'T2t_vit_7'): a hint only

    def state_dict(self, use_ema: bool = True) -> StateDict:
        return self.ema if use_ema and self.ema is not None else self.model

    @property
    def num_classes(self) -> int | None:
        """Classes of the checkpoint's head (our formats: their config), None when it has no head."""
        if 'num_classes' in self.model_kwargs:
            return int(self.model_kwargs['num_classes'])
        head = self.model.get('head.weight')
        return int(head.shape[0]) if head is not None and head.ndim == 2 else None


# -- writing ----------------------------------------------------------------------------------------------
def _atomic_write(path: PathLike, write: Callable[[io.BufferedWriter], None]) -> str:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save(obj: Any, path: PathLike) -> str:
    """``torch.save`` that never leaves a half-written file: a temporary file beside ``path``, then ``os.replace``."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def _portable(sd: StateDict) -> StateDict:
    return {k: v.detach().to('cpu').contiguous() for k, v in sd.items()}


def save_reference(path: PathLike, state_dict: StateDict, ema: StateDict | None = None,
                   arch: str | None = None, epoch: int | None = None) -> str:
    """A ``.pth.tar`` the reference code loads: ``state_dict`` (and ``state_dict_ema``), no ``module.`` prefix."""
    obj: dict[str, Any] = {'state_dict': _portable(state_dict)}
    if ema is not None:
        obj['state_dict_ema'] = _portable(ema)
    if arch is not None:
        obj['arch'] = arch
    if epoch is not None:
        obj['epoch'] = int(epoch)
    return atomic_save(obj, path)


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
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


def _from_json_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


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
    return name, _jsonable(kwargs)


def _write_t2tvit(path: PathLike, state_dict: StateDict, model_name: str, model_kwargs: dict[str, Any],
                  class_names: list[str] | None = None, weights: str = 'model') -> str:
    from safetensors.torch import save as st_save
    try:
        expected = _signature_of(model_name, json.dumps(_jsonable(model_kwargs), sort_keys=True))
    except _BUILD_ERRORS as e:
        raise CheckpointError(f'cannot build {model_name}({_kwargs_text(model_kwargs)}) to check the weights: '
                              f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if got != expected:
        diff = _differences(got, expected)
        raise CheckpointError(f'the weights do not fit {model_name}({_kwargs_text(model_kwargs)}): {diff}; '
                              'pass the model arguments it was built with')
    metadata = {
        'format': T2TVIT_FORMAT,
        'format_version': str(T2TVIT_FORMAT_VERSION),
        'config': json.dumps({'model': model_name, 'model_kwargs': _jsonable(model_kwargs)}),
        'weights': weights,
    }
    if class_names is not None:
        metadata['class_names'] = json.dumps(list(class_names))
    data = st_save(_portable(state_dict), metadata=metadata)
    return _atomic_write(path, lambda f: f.write(data))


def save_model(model: nn.Module, path: PathLike, class_names: list[str] | None = None,
               model_name: str | None = None, model_kwargs: dict[str, Any] | None = None) -> str:
    """Write ``model``'s weights in t2tvit's safetensors format, its config in the metadata.

    The name and constructor arguments are the ones :func:`t2tvit.create_model` recorded (its
    ``img_size`` and ``num_classes`` always), unless given; the file is checked to rebuild a model
    of the same keys and shapes. ``create_model_from_checkpoint(path)`` recreates the model.
    """
    name, kwargs = _model_config(model, model_name, model_kwargs)
    return _write_t2tvit(path, model.state_dict(), name, kwargs, class_names)


# -- reading ----------------------------------------------------------------------------------------------
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


class _NumpyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, dtypes and dicts; any other global (a function to call) is refused."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path
        import numpy as np
        try:
            from numpy._core import multiarray
        except ImportError:  # numpy < 2
            from numpy.core import multiarray
        self._allowed = {
            ('numpy._core.multiarray', '_reconstruct'): multiarray._reconstruct,
            ('numpy.core.multiarray', '_reconstruct'): multiarray._reconstruct,
            ('numpy', 'ndarray'): np.ndarray,
            ('numpy', 'dtype'): np.dtype,
            ('collections', 'OrderedDict'): OrderedDict,
        }

    def find_class(self, module: str, name: str):
        found = self._allowed.get((module, name))
        if found is None:
            raise CheckpointError(_refusal(self._path, f'{module}.{name}'))
        return found

    def persistent_load(self, pid):
        raise CheckpointError(f'{self._path}: not a PaddlePaddle .pdparams file (it refers to external objects); '
                              f'give {_FORMATS_HINT}')


def _refusal(path: str, what: str) -> str:
    return (f'{path}: refused, loading it would run code ({what}), not only read weights; if you trust its '
            'source, re-save its state dict with torch.save(model.state_dict(), PATH) and load that')


def _corrupt(path: str, e: BaseException) -> CheckpointError:
    detail = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return CheckpointError(f'{path}: not a readable checkpoint, the file looks truncated or corrupt '
                           f'({detail[:120]}); download or save it again')


def _torch_load(path: str) -> Any:
    try:
        # the reference releases may pickle the run's argparse.Namespace: plain values, safe to rebuild
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights only load failed' in str(e).lower():
            found = re.search(r'GLOBAL (\S+)', str(e))
            raise CheckpointError(_refusal(path, found.group(1) if found else 'an arbitrary object')) from None
        raise _corrupt(path, e) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
        raise _corrupt(path, e) from None


# how a truncated or garbled pickle stream fails
_TRUNCATED_PICKLE = (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
                     OverflowError, MemoryError)
# how a model that cannot be built with some arguments fails
_BUILD_ERRORS = (ValueError, TypeError, AssertionError, RuntimeError, NotImplementedError, KeyError)


def _numpy_pickle_load(path: str) -> Any:
    import numpy as np
    try:
        with open(path, 'rb') as f:
            obj = _NumpyUnpickler(f, path).load()
    except CheckpointError:
        raise
    except _TRUNCATED_PICKLE as e:
        raise _corrupt(path, e) from None
    if not isinstance(obj, dict):
        return obj
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in obj.items()}


_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)[:-1]  # torch.save before zip files


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], 'little')
    return 0 < header_len <= size - 8 and head[8:9] == b'{'


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _read_safetensors(path: str) -> Checkpoint:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework='pt', device='cpu') as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is no dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, e) from None
    if metadata.get('format') != T2TVIT_FORMAT:
        return Checkpoint(path, 'plain', strip_prefixes(sd))
    version = int(metadata.get('format_version', 1))
    if version > T2TVIT_FORMAT_VERSION:
        raise CheckpointError(f'{path}: written by a newer t2tvit (format version {version}); upgrade t2tvit')
    try:
        config = json.loads(metadata.get('config') or '{}')
        class_names = json.loads(metadata['class_names']) if 'class_names' in metadata else None
    except json.JSONDecodeError as e:
        raise _corrupt(path, e) from None
    return Checkpoint(path, 't2tvit', sd, model_name=config.get('model'),
                      model_kwargs=_from_json_kwargs(config.get('model_kwargs') or {}), class_names=class_names)


def _state(path: str, obj: Any, what: str) -> StateDict:
    if not _is_tensor_dict(obj):
        raise CheckpointError(f'{path}: {what} is not a state dict of tensors; give {_FORMATS_HINT}')
    return strip_prefixes(obj)


def _classify(path: str, obj: Any) -> Checkpoint:
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path}: holds a {type(obj).__name__}, not model weights; give {_FORMATS_HINT}')
    if obj.get('format') == TRAIN_FORMAT:
        version = int(obj.get('version', 1))
        if version > TRAIN_FORMAT_VERSION:
            raise CheckpointError(f'{path}: written by a newer t2tvit (training format version {version}); '
                                  'upgrade t2tvit')
        config = obj.get('config') or {}
        ema = obj.get('ema')
        return Checkpoint(path, 'train', _state(path, obj.get('model'), "its 'model'"),
                          ema=_state(path, ema, "its 'ema'") if ema is not None else None,
                          model_name=config.get('model'), model_kwargs=dict(config.get('model_kwargs') or {}),
                          class_names=obj.get('class_names'), epoch=obj.get('epoch'))
    if 'state_dict' in obj or 'state_dict_ema' in obj:
        raw = obj.get('state_dict')
        ema = obj.get('state_dict_ema')
        model = _state(path, raw if raw is not None else ema, "its 'state_dict'")
        arch = obj.get('arch') if isinstance(obj.get('arch'), str) else None
        return Checkpoint(path, 'reference', model, ema=_state(path, ema, "its 'state_dict_ema'") if ema else None,
                          epoch=obj.get('epoch') if isinstance(obj.get('epoch'), int) else None, arch=arch)
    if isinstance(obj.get('net'), dict):
        return Checkpoint(path, 'cifar', _state(path, obj['net'], "its 'net'"),
                          epoch=obj.get('epoch') if isinstance(obj.get('epoch'), int) else None)
    if isinstance(obj.get('model'), dict):  # DeiT / timm training scripts: {'model': state_dict, ...}
        return Checkpoint(path, 'plain', _state(path, obj['model'], "its 'model'"))
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and any(isinstance(k, str) and k.startswith(('backbone.', 'head.fc_cls.'))
                       for k in tensors):
        return Checkpoint(path, 'passl', passl_to_reference(tensors))
    if _is_tensor_dict(obj):
        return Checkpoint(path, 'plain', strip_prefixes(obj))
    keys = ', '.join(repr(k) for k in list(obj)[:5])
    raise CheckpointError(f'{path}: not a model checkpoint (a dict of {keys}{", ..." if len(obj) > 5 else ""}); '
                          f'expected a state dict or a dict with state_dict/net/model, in {_FORMATS_HINT}')


def read_checkpoint(path: PathLike) -> Checkpoint:
    """Read any supported checkpoint file into a :class:`Checkpoint` (reference key layout, on the CPU)."""
    path = os.fspath(path)
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f'{path}: no such checkpoint file (check the path)')
    if p.is_dir():
        raise CheckpointError(f'{path}: is a folder, not a checkpoint file (give the file, e.g. {path}/best.pth)')
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f'{path}: the file is empty; download or save it again')
    with open(path, 'rb') as f:
        head = f.read(16)
    if head.startswith((b'PK', _LEGACY_TORCH_MAGIC)):
        return _classify(path, _torch_load(path))
    if _is_safetensors(head, size):
        return _read_safetensors(path)
    if head.startswith(b'\x80'):  # a bare pickle: PASSL's paddle.save
        return _classify(path, _numpy_pickle_load(path))
    raise CheckpointError(f'{path}: not a checkpoint file; give {_FORMATS_HINT}')


# -- released weights: torch hub's cache -------------------------------------------------------------------
def pretrained_path(cfg: dict[str, Any], cache_dir: PathLike | None = None) -> str:
    """Where a pretrained tag's file is kept: ``cache_dir`` or timm's (torch hub's) cache,
    ``$TORCH_HOME/hub/checkpoints/<release file name>``; nothing is created."""
    from urllib.parse import urlparse
    filename = os.path.basename(urlparse(cfg['url']).path)
    folder = os.fspath(cache_dir) if cache_dir else os.path.join(torch.hub.get_dir(), 'checkpoints')
    return os.path.join(folder, filename)


def _tag_label(cfg: dict[str, Any]) -> str:
    arch, tag = cfg.get('architecture') or 'the model', cfg.get('tag')
    return f'{arch}.{tag}' if tag else arch


def fetch_pretrained(cfg: dict[str, Any], cache_dir: PathLike | None = None) -> str | None:
    """The local file of a release tag's weights (``cfg``: its timm pretrained cfg), downloaded into the cache
    when missing. None for sources timm reads itself (a local folder, the Hugging Face hub, a state dict).

    Without network and without the cached file: a :class:`CheckpointError` naming the URL and the path
    to place the file at.
    """
    if cfg.get('source') in ('local-dir', 'hf-hub') or cfg.get('file') or cfg.get('state_dict') \
            or cfg.get('hf_hub_id'):
        return None
    label = _tag_label(cfg)
    if not cfg.get('url'):
        raise CheckpointError(f'{label} has no released weights: `t2tvit models --pretrained` lists the tags that '
                              'have, or load your own with checkpoint_path=... (--checkpoint PATH)')
    if not cfg.get('custom_load'):
        return None  # a plain state dict at a URL: timm's own loader reads it
    path = pretrained_path(cfg, cache_dir)
    if os.path.isfile(path):
        return path
    from timm.models._hub import download_cached_file
    url = cfg['url'] if isinstance(cfg['url'], str) else cfg['url'][0]
    _logger.info('%s: downloading %s to %s', label, url, path)
    try:
        return download_cached_file(url, check_hash=False, progress=False, cache_dir=os.path.dirname(path))
    except (OSError, ValueError, RuntimeError) as e:  # URLError, HTTPError, socket errors are OSErrors
        reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise CheckpointError(f'{label}: cannot download {url} ({reason[:120]}); fetch that file where there is '
                              f'network and place it at {path}') from None


# -- which registered model a state dict belongs to -------------------------------------------------------
def _meta_model(name: str, kwargs_json: str = '{}') -> nn.Module:
    import timm
    with torch.device('meta'):
        return timm.create_model(name, **_from_json_kwargs(json.loads(kwargs_json)))


@lru_cache(maxsize=64)
def _signature_of(name: str, kwargs_json: str = '{}') -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _meta_model(name, kwargs_json).state_dict().items()}


def _arch_keys(sig: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Keys and shapes that fix the architecture: not the head (num_classes) nor the table's length (img_size)."""
    out = {k: v for k, v in sig.items() if not k.startswith('head.')}
    if 'pos_embed' in out:
        out['pos_embed'] = out['pos_embed'][-1:]
    if 'head.weight' in sig:
        out['head.weight'] = sig['head.weight'][1:]
    return out


def closest_models(state_dict: StateDict, limit: int = 3) -> list[tuple[str, float]]:
    """Registered models ranked by the share of architecture keys (and shapes) they have in common with
    ``state_dict``: ``[(name, share in 0..1)]``. Models are built on the meta device, no weights are made."""
    from .factory import list_models
    from .models import ABLATION_CONFIGS, MODEL_CONFIGS
    configs = {**MODEL_CONFIGS, **ABLATION_CONFIGS}
    mine = _arch_keys({k: tuple(v.shape) for k, v in state_dict.items()})
    names = list_models()
    cls = state_dict.get('cls_token')
    if cls is not None:  # the width is in every config: build only the models of the checkpoint's width
        same_width = [n for n in names if configs.get(n, {}).get('embed_dim') == cls.shape[-1]]
        names = same_width or names
    scores = []
    for name in names:
        try:
            theirs = _arch_keys(_signature_of(name))
        except _BUILD_ERRORS:  # a model that cannot be built on the meta device is no candidate
            continue
        same = sum(1 for k, s in mine.items() if theirs.get(k) == s)
        scores.append((name, same / max(len(mine), len(theirs), 1)))
    scores.sort(key=lambda t: -t[1])
    return scores[:limit]


def _looks_like(state_dict: StateDict) -> str:
    ranked = closest_models(state_dict)
    if not ranked or ranked[0][1] < 0.5:
        return 'it matches no registered model (run `t2tvit models` for the list)'
    best = ranked[0][1]
    tied = [n for n, s in ranked if s == best]
    names = ' or '.join(tied)
    share = 'all' if best == 1.0 else f'{100 * best:.0f}% of the'
    return f'it looks like a {names} checkpoint ({share} keys and shapes match)'


def _differences(got: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]], limit: int = 3) -> str:
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    shapes = [f'{k} {list(got[k])} vs {list(want[k])}' for k in want if k in got and got[k] != want[k]]
    parts = []
    for label, items in (('shapes differ (checkpoint vs model)', shapes), ('missing', missing),
                         ('unexpected', unexpected)):
        if items:
            more = f' and {len(items) - limit} more' if len(items) > limit else ''
            parts.append(f"{label}: {', '.join(items[:limit])}{more}")
    return '; '.join(parts)


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ', '.join(f'{k}={v!r}' for k, v in kwargs.items())


# -- fitting a state dict to a model ----------------------------------------------------------------------
def _model_label(model: nn.Module) -> str:
    recorded = getattr(model, 't2tvit_config', None) or {}
    return recorded.get('model') or (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') \
        or type(model).__name__


def _checkpoint_grid(ckpt: Checkpoint | None, table: torch.Tensor, prefix: int) -> tuple[int, int] | None:
    """The grid of a checkpoint's position table: from our formats' config, else a square root."""
    if ckpt is not None and ckpt.model_name and 'img_size' in ckpt.model_kwargs:
        try:
            grid = tuple(_meta_model(ckpt.model_name, json.dumps(_jsonable(ckpt.model_kwargs))).grid_size)
            if grid[0] * grid[1] + prefix == table.shape[1]:
                return grid
        except _BUILD_ERRORS:
            _logger.debug('%s: cannot rebuild %s to read its grid', ckpt.path, ckpt.model_name)
    side = math.isqrt(table.shape[1] - prefix)
    return (side, side) if side * side == table.shape[1] - prefix else None


def _first_layer_weight(model: nn.Module) -> str | None:
    """State-dict key of the weight that reads the image (``pretrained_cfg['first_conv']``)."""
    first = (getattr(model, 'pretrained_cfg', None) or {}).get('first_conv')
    return f'{first}.weight' if isinstance(first, str) else None


def _repeat_channels(t: torch.Tensor, chans: int, scale: float = 1.0) -> torch.Tensor:
    """(out, 3, ...) -> (out, chans, ...): R, G, B repeated in turn, times ``scale``."""
    reps = (chans + 2) // 3
    return t.repeat(1, reps, *([1] * (t.ndim - 2)))[:, :chans] * scale


def adapt_input_channels(sd: StateDict, own: StateDict, first: str | None) -> int | None:
    """Fit the RGB layer that reads the image (key ``first``) to the model's number of input channels, in place.

    timm's rule for a first convolution: one channel gets the sum over R, G, B (a gray image gives the
    response of its 3-channel copy), more channels repeat R, G, B scaled by 3 / channels. The T2T soft split
    feeds an unfolded patch (channel by channel) through a LayerNorm into a Linear: for one channel the
    LayerNorm's affine part is folded into the Linear, which keeps that gray-image identity exact (a
    replicated patch has the same mean and variance); for more, the LayerNorm's weight and bias repeat
    like the channels. Returns the channel count, or None where ``first`` is no such layer.
    """
    if first is None or first not in sd or first not in own or sd[first].shape == own[first].shape:
        return None
    w, shape = sd[first], own[first].shape
    if w.ndim != len(shape) or w.shape[0] != shape[0] or w.ndim not in (2, 4):
        return None
    if w.ndim == 4:
        if w.shape[1] != 3 or w.shape[2:] != shape[2:]:
            return None
        chans = shape[1]
        sd[first] = (w.float().sum(1, keepdim=True) if chans == 1
                     else _repeat_channels(w.float(), chans, 3 / chans)).to(w.dtype)
        return chans
    if w.shape[1] % 3 or shape[1] % (w.shape[1] // 3):
        return None
    patch, chans = w.shape[1] // 3, shape[1] // (w.shape[1] // 3)
    norms = [k for k in sd if k.endswith('norm1.weight') and tuple(sd[k].shape) == (w.shape[1],)
             and k in own and tuple(own[k].shape) == (shape[1],)]
    if len(norms) != 1:
        return None
    norm, bias = norms[0][:-len('weight')], first[:-len('weight')] + 'bias'
    gamma, beta, w32 = sd[norm + 'weight'].float(), sd[norm + 'bias'].float(), w.float()
    if chans == 1:
        sd[first] = (w32.reshape(-1, 3, patch) * gamma.reshape(3, patch)).sum(1).to(w.dtype)
        if bias in sd:
            sd[bias] = (sd[bias].float() + w32 @ beta).to(sd[bias].dtype)
        sd[norm + 'weight'], sd[norm + 'bias'] = torch.ones_like(gamma[:patch]), torch.zeros_like(beta[:patch])
    else:
        sd[first] = _repeat_channels(w32.reshape(-1, 3, patch), chans, 3 / chans).reshape(shape).to(w.dtype)
        sd[norm + 'weight'] = _repeat_channels(gamma.reshape(1, 3, patch), chans).reshape(-1)
        sd[norm + 'bias'] = _repeat_channels(beta.reshape(1, 3, patch), chans).reshape(-1)
    return chans


def _fit_state_dict(sd: StateDict, model: nn.Module, source: str, ckpt: Checkpoint | None = None,
                    strict: bool = True) -> StateDict:
    """``sd`` adapted to ``model``: head left out when the classes differ, position table resized."""
    own = model.state_dict()
    sd = dict(sd)
    label = _model_label(model)
    notes: list[tuple[int, str]] = []  # told only once the checkpoint is known to fit
    own_head = {k: v for k, v in own.items() if k.startswith('head.')}
    head_w, own_head_w = sd.get('head.weight'), own.get('head.weight')
    if not own_head and head_w is not None:
        sd = {k: v for k, v in sd.items() if not k.startswith('head.')}
        notes.append((logging.INFO, f"{source}: the model has no classifier; the checkpoint's head is not used"))
    elif own_head_w is not None and not any(k.startswith('head.') for k in sd):
        sd.update(own_head)
        message = (f'{source} has no classifier: the head of {label} ({own_head_w.shape[0]} classes) keeps its '
                   'random initialisation; train it (t2tvit finetune)')
        notes.append((logging.WARNING, message))
    elif own_head_w is not None and head_w is not None and head_w.ndim == 2 and own_head_w.ndim == 2 \
            and head_w.shape[1] == own_head_w.shape[1] and head_w.shape[0] != own_head_w.shape[0]:
        sd = {k: v for k, v in sd.items() if not k.startswith('head.')}
        sd.update(own_head)
        message = (f'{source} classifies {head_w.shape[0]} classes, the model {own_head_w.shape[0]}: the head is '
                   're-initialised (not loaded); train it (t2tvit finetune)')
        notes.append((logging.WARNING, message))

    grid_problem = None
    table, own_table = sd.get('pos_embed'), own.get('pos_embed')
    if table is not None and own_table is not None and table.shape != own_table.shape \
            and table.ndim == 3 and table.shape[-1] == own_table.shape[-1] and hasattr(model, 'grid_size'):
        prefix = int(getattr(model, 'num_prefix_tokens', 1))
        mode = getattr(model, 'pos_embed_resize', 'bicubic')
        new_grid = tuple(model.grid_size)
        old_grid = _checkpoint_grid(ckpt, table, prefix)
        if old_grid is None and mode != 'sinusoid':
            grid_problem = (f'{source}: cannot tell the grid of its position table ({table.shape[1] - prefix} '
                            'positions, not a square); build the model with the img_size it was trained at')
        else:
            sd['pos_embed'] = resize_pos_table(table, new_grid, old_grid=old_grid, num_prefix_tokens=prefix,
                                               mode=mode)
            old = f'{old_grid[0]}x{old_grid[1]}' if old_grid else f'{table.shape[1] - prefix} positions'
            notes.append((logging.INFO, f'{source}: position table {old} -> {new_grid[0]}x{new_grid[1]} ({mode})'))

    chans = adapt_input_channels(sd, own, _first_layer_weight(model))
    if chans is not None:
        notes.append((logging.INFO, f'{source}: the RGB input layer adapted to {chans} input channels'))

    got = {k: tuple(v.shape) for k, v in sd.items()}
    want = {k: tuple(v.shape) for k, v in own.items()}
    bad_shapes = [k for k in got if k in want and got[k] != want[k]]
    if bad_shapes or (strict and got.keys() != want.keys()):
        if grid_problem and bad_shapes == ['pos_embed'] and got.keys() == want.keys():
            raise CheckpointError(grid_problem)
        raise CheckpointError(f'{source} does not fit {label}: {_differences(got, want)}; {_looks_like(sd)}')
    for level, message in notes:
        _logger.log(level, message)
    return sd


def load_checkpoint(model: nn.Module, path: PathLike | Checkpoint, use_ema: bool = True,
                    strict: bool = True):
    """Load any supported checkpoint into ``model``; returns torch's ``(missing_keys, unexpected_keys)``.

    EMA weights are used when the file has them and ``use_ema``. Another ``num_classes`` leaves the
    model's head as initialised (with a warning); another image size resizes the position table.
    ``strict=False`` allows missing and unexpected keys, never different shapes. Raises
    :class:`CheckpointError` (a :class:`~t2tvit.errors.UserError`) for unreadable files and
    checkpoints of another architecture.
    """
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    sd = _fit_state_dict(ckpt.state_dict(use_ema), model, f'checkpoint {ckpt.path}', ckpt, strict=strict)
    return model.load_state_dict(sd, strict=strict)


# -- models from checkpoints ------------------------------------------------------------------------------
def _img_size_from_table(sd: StateDict, name: str, kwargs: dict[str, Any]) -> int | None:
    """The square image size whose grid matches a reference checkpoint's position table (e.g. 384)."""
    table = sd.get('pos_embed')
    if table is None or table.ndim != 3:
        return None
    try:
        model = _meta_model(name, json.dumps(_jsonable(kwargs), sort_keys=True))
    except _BUILD_ERRORS:
        return None
    prefix = int(getattr(model, 'num_prefix_tokens', 1))
    if table.shape[1] == model.pos_embed.shape[1] or not hasattr(model, 'grid_size'):
        return None
    side = math.isqrt(table.shape[1] - prefix)
    (gh, gw), (ih, iw) = model.grid_size, model.img_size
    if side * side != table.shape[1] - prefix or gh != gw or ih != iw or ih % gh:
        return None
    size = side * (ih // gh)
    try:
        _meta_model(name, json.dumps(_jsonable({**kwargs, 'img_size': size}), sort_keys=True))
    except _BUILD_ERRORS:
        return None
    return size


def model_args_from_checkpoint(ckpt: Checkpoint, name: str | None = None, **kwargs
                               ) -> tuple[str, dict[str, Any]]:
    """The model name and constructor arguments to load ``ckpt`` into: ``kwargs`` first, then the checkpoint's.

    Our formats give their config (name, ``img_size``, ``num_classes``, any other argument); the
    reference layouts give ``num_classes`` from the head and ``img_size`` from the position table.
    """
    from .factory import UnknownModelError, list_models
    given = {k: v for k, v in kwargs.items() if v is not None}
    if name is None:
        name = ckpt.model_name
        if name is None and ckpt.arch and ckpt.arch.lower() in list_models():
            name = ckpt.arch.lower()
        if name is None:
            raise CheckpointError(f'{ckpt.path} does not name its model; {_looks_like(ckpt.model)}: give the model '
                                  'name (create_model(NAME, checkpoint_path=...), or --model NAME)')
    arch = name.split('.')[0]  # a pretrained tag (t2t_vit_14.in1k_ft_cifar10) brings its data config
    if ckpt.model_name and ckpt.model_name != arch:
        raise CheckpointError(f'{ckpt.path} holds a {ckpt.model_name} model, not {name} '
                              f'(use {ckpt.model_name}, or leave the name out)')
    if arch not in list_models():
        raise CheckpointError(str(UnknownModelError(arch, list_models())))
    merged = {**ckpt.model_kwargs, **given}
    if 'num_classes' not in merged and ckpt.num_classes is not None:
        merged['num_classes'] = ckpt.num_classes
    if 'img_size' not in merged:
        size = _img_size_from_table(ckpt.model, name, merged)
        if size is not None:
            _logger.info('%s: img_size %d, from the position table of the checkpoint', ckpt.path, size)
            merged['img_size'] = size
    return name, merged


def create_model_from_checkpoint(path: PathLike, name: str | None = None, **kwargs) -> nn.Module:
    """The model a checkpoint file describes, with its weights: ``create_model(name, checkpoint_path=path)``.

    Files in our formats name their model, so ``name`` may be left out; ``kwargs`` override the
    checkpoint's arguments (``img_size=384`` resizes the position table, ``num_classes=10`` gives a
    new head).
    """
    from .factory import create_model
    return create_model(name, checkpoint_path=path, **kwargs)


# -- conversion -------------------------------------------------------------------------------------------
CONVERT_TARGETS = ('reference', 't2tvit', 'hf')


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
        model = _meta_model(name, json.dumps(_jsonable(kwargs), sort_keys=True))
    except _BUILD_ERRORS as e:
        raise CheckpointError(f'{src}: cannot build {name}({_kwargs_text(kwargs)}): '
                              f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
    order = list(model.state_dict())

    def fitted(sd: StateDict, which: str) -> StateDict:
        got = {k: tuple(v.shape) for k, v in sd.items()}
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if got != want:
            raise CheckpointError(f'{src} ({which} weights) does not fit {name}: {_differences(got, want)}; '
                                  f'{_looks_like(sd)}')
        return {k: sd[k] for k in order}

    arch = name.split('.')[0]  # a pretrained tag names the model and brings its class names
    labels = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')
    class_names = ckpt.class_names or (list(labels) if labels and len(labels) == model.num_classes else None)
    if to == 'reference':
        raw = fitted(ckpt.model, 'raw')
        ema = fitted(ckpt.ema, 'EMA') if ckpt.ema is not None else None
        save_reference(dst, raw, ema, arch=arch, epoch=ckpt.epoch)
        weights = 'state_dict + state_dict_ema' if ema is not None else 'state_dict'
    else:
        chosen = 'ema' if use_ema and ckpt.ema is not None else 'model'
        sd = fitted(ckpt.state_dict(use_ema), chosen)
        if to == 'hf':
            _write_hf(dst, sd, name, kwargs, class_names)
        else:
            _write_t2tvit(dst, sd, arch, kwargs, class_names, weights=chosen)
        weights = 'EMA weights' if chosen == 'ema' else 'weights'
    return {'path': os.fspath(dst), 'model': name, 'model_kwargs': kwargs, 'weights': weights, 'layout': ckpt.layout}


def _write_hf(folder: PathLike, state_dict: StateDict, name: str, kwargs: dict[str, Any],
              class_names: list[str] | None) -> str:
    """timm's own hub export (``save_for_hf``) of the model with these weights: config.json + model.safetensors."""
    import timm
    from timm.models import save_for_hf
    folder = os.fspath(folder)
    if os.path.isfile(folder):
        raise CheckpointError(f'{folder}: is a file; --to hf writes a folder (config.json, model.safetensors)')
    model = timm.create_model(name, **kwargs)
    model.load_state_dict(state_dict, strict=True)
    labels = {'label_names': list(class_names)} if class_names and len(class_names) == model.num_classes else {}
    save_for_hf(model, folder, model_config=labels, safe_serialization=True)
    return folder
