"""Bytes to Python objects and back: atomic writes, safe unpickling, the released weights' cache.

Nothing is unpickled beyond tensors and plain values: PyTorch files go through
``torch.load(weights_only=True)``, PASSL's ``.pdparams`` through an unpickler that can only rebuild
numpy arrays; a file that needs anything else is refused. What a loaded object means (which layout,
which keys) is for :mod:`t2tvit.checkpoint.layouts`.
"""
import argparse
import io
import logging
import os
import pickle
import re
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from ..errors import UserError

__all__ = ['CheckpointError', 'atomic_save', 'atomic_write', 'fetch_pretrained', 'load_file', 'portable',
           'pretrained_path']

_logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike

FORMATS_HINT = 'a PyTorch .pth/.pth.tar, a .safetensors or a PaddlePaddle .pdparams file'


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or does not fit the model: the message says which and how to fix it."""


# -- writing ----------------------------------------------------------------------------------------------
def atomic_write(path: PathLike, write: Callable[[io.BufferedWriter], None]) -> str:
    """Write through ``write(file)`` to a temporary file beside ``path``, then ``os.replace``: never half a file."""
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
    return atomic_write(path, lambda f: torch.save(obj, f))


def portable(sd: StateDict) -> StateDict:
    """Detached, contiguous CPU copies: what a file should hold whatever device the model trained on."""
    return {k: v.detach().to('cpu').contiguous() for k, v in sd.items()}


# -- reading ----------------------------------------------------------------------------------------------
class _NumpyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, dtypes and dicts; any other global (a function to call) is refused."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path
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
                              f'give {FORMATS_HINT}')


def _refusal(path: str, what: str) -> str:
    return (f'{path}: refused, loading it would run code ({what}), not only read weights; if you trust its '
            'source, re-save its state dict with torch.save(model.state_dict(), PATH) and load that')


def corrupt(path: str, e: BaseException) -> CheckpointError:
    """The error for a file that starts like a checkpoint but cannot be read to its end."""
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
        raise corrupt(path, e) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
        raise corrupt(path, e) from None


# how a truncated or garbled pickle stream fails
_TRUNCATED_PICKLE = (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
                     OverflowError, MemoryError)


def _numpy_pickle_load(path: str) -> Any:
    try:
        with open(path, 'rb') as f:
            obj = _NumpyUnpickler(f, path).load()
    except CheckpointError:
        raise
    except _TRUNCATED_PICKLE as e:
        raise corrupt(path, e) from None
    if not isinstance(obj, dict):
        return obj
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in obj.items()}


def _safetensors_load(path: str) -> tuple[StateDict, dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework='pt', device='cpu') as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is no dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise corrupt(path, e) from None
    return sd, metadata


_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)[:-1]  # torch.save before zip files


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], 'little')
    return 0 < header_len <= size - 8 and head[8:9] == b'{'


def load_file(path: str) -> tuple[str, Any]:
    """What a checkpoint file holds, told apart by its first bytes, not its name: ``('torch', object)``,
    ``('safetensors', (tensors, metadata))`` or ``('pickle', object)`` (PASSL's ``paddle.save``, numpy arrays
    as tensors)."""
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
        return 'torch', _torch_load(path)
    if _is_safetensors(head, size):
        return 'safetensors', _safetensors_load(path)
    if head.startswith(b'\x80'):  # a bare pickle: PASSL's paddle.save
        return 'pickle', _numpy_pickle_load(path)
    raise CheckpointError(f'{path}: not a checkpoint file; give {FORMATS_HINT}')


# -- released weights: torch hub's cache -------------------------------------------------------------------
def pretrained_path(cfg: dict[str, Any], cache_dir: PathLike | None = None) -> str:
    """Where a pretrained tag's file is kept: ``cache_dir`` or timm's (torch hub's) cache,
    ``$TORCH_HOME/hub/checkpoints/<release file name>``; nothing is created."""
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
