"""Everything a run needs to survive a crash: one state object, written atomically, restored exactly.

A training checkpoint (``last.pth``, ``best.pth``) is the project's ``t2tvit-train`` format: model,
EMA, optimizer, scheduler, grad scaler, every rank's RNG states, epoch, step, the resolved config
and the class names, plus ``progress`` (where in the epoch the run stopped, the running sums of
the epoch, the best metric so far). Only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``.

Resuming restores all of it, then skips the batches of the interrupted epoch that were already
trained on (the sampler order is a function of seed and epoch, the augmentation a function of
seed, epoch and image): the resumed run computes exactly what the uninterrupted one would have.
"""

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..checkpoint import TRAIN_FORMAT, TRAIN_FORMAT_VERSION, atomic_save
from ..errors import UserError


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken (skipped non-finite steps excluded)
    batches_done: int = 0  # batches of epoch ``epoch`` already trained on (a run stopped mid-epoch)
    eval_pending: bool = False  # training of epoch ``epoch`` done, its evaluation not
    loss_sum: float = 0.0  # running sums of the epoch in progress
    samples: int = 0
    seconds: float = 0.0
    failed: List[str] = field(default_factory=list)
    failed_count: int = 0
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    best_kept: Optional[str] = None  # 'model' or 'ema': whose validation gave best_metric
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0

    def start_epoch(self) -> None:
        self.batches_done = 0
        self.eval_pending = False
        self.loss_sum = 0.0
        self.samples = 0
        self.seconds = 0.0
        self.failed = []
        self.failed_count = 0


# -- RNG --------------------------------------------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    """This process's generators as tensors and plain values."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        'python': {'version': version, 'state': list(mt), 'gauss': gauss},
        'numpy': {
            'name': name,
            'keys': torch.from_numpy(keys.astype(np.int64)),
            'pos': int(pos),
            'has_gauss': int(has_gauss),
            'cached_gaussian': float(cached),
        },
        'torch': torch.get_rng_state(),
        'cuda': [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
    }
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state['python']
    random.setstate((py['version'], tuple(py['state']), py['gauss']))
    npy = state['numpy']
    np.random.set_state(
        (
            npy['name'],
            npy['keys'].numpy().astype(np.uint32),
            npy['pos'],
            npy['has_gauss'],
            npy['cached_gaussian'],
        )
    )
    torch.set_rng_state(state['torch'])
    if (
        state.get('cuda') is not None
        and torch.cuda.is_available()
        and len(state['cuda']) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(state['cuda'])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# -- checkpoint --------------------------------------------------------------------------------------------
def checkpoint_dict(
    *,
    model,
    ema,
    optimizer,
    scheduler,
    scaler,
    rng: List[Dict[str, Any]],
    state: TrainState,
    config: Dict[str, Any],
    class_names: List[str],
    kept: Optional[str] = None,
) -> Dict[str, Any]:
    """The ``t2tvit-train`` checkpoint (agreed with ``t2tvit.checkpoint``), tensors on the CPU; ``kept``: the
    weights it serves by default ('model' or 'ema'; None: the EMA when there is one)."""
    return {
        'kept': kept,
        'format': TRAIN_FORMAT,
        'version': TRAIN_FORMAT_VERSION,
        'model': _cpu(model.state_dict()),
        'ema': _cpu(ema.module.state_dict()) if ema is not None else None,
        'optimizer': _cpu(optimizer.state_dict()),
        'scheduler': _plain(scheduler.state_dict()) if scheduler is not None else None,
        'scaler': scaler.state_dict() if scaler is not None else None,
        'rng': {'world_size': len(rng), 'ranks': rng},
        'epoch': state.epoch,
        'step': state.step,
        'progress': asdict(state),
        'config': config,
        'class_names': list(class_names),
    }


def save(ckpt: Dict[str, Any], path) -> None:
    atomic_save(ckpt, path)


def read_training_checkpoint(path: Path, model: str, class_names: Sequence[str]) -> Dict[str, Any]:
    """``--resume PATH``, read once: a training checkpoint of this project, of ``model``, on these classes."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'--resume {path}: not a readable checkpoint ({type(e).__name__})') from None
    if not isinstance(ckpt, dict) or ckpt.get('format') != TRAIN_FORMAT:
        raise UserError(
            f'--resume {path}: not a training checkpoint of this project (to start from other '
            f'weights use t2tvit finetune --checkpoint)'
        )
    trained = (ckpt.get('config') or {}).get('model')
    if trained != model:
        raise UserError(f'--resume {path}: the checkpoint is for model {trained}, this run is {model}')
    if list(ckpt.get('class_names') or []) != list(class_names):
        raise UserError(
            f'--resume {path}: the checkpoint was trained on other classes than this data '
            f'({len(ckpt.get("class_names") or [])} vs {len(class_names)})'
        )
    return ckpt


def restore(
    ckpt: Dict[str, Any], *, model, ema, optimizer, scheduler, scaler, rank: int, world_size: int
) -> (TrainState, bool):
    """Load every part into the live objects; returns the state and whether this rank's RNG came back."""
    model.load_state_dict(ckpt['model'])
    if ema is not None:
        ema.module.load_state_dict(ckpt['ema'] if ckpt.get('ema') is not None else ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    if scheduler is not None and ckpt.get('scheduler') is not None:
        scheduler.load_state_dict(ckpt['scheduler'])
    if scaler is not None and ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    progress = dict(ckpt.get('progress') or {})
    state = TrainState(**{k: v for k, v in progress.items() if k in TrainState.__dataclass_fields__})
    state.epoch, state.step = int(ckpt['epoch']), int(ckpt['step'])
    rng = ckpt.get('rng') or {}
    ranks = rng.get('ranks') or []
    same_world = rng.get('world_size') == world_size and len(ranks) == world_size
    if same_world:
        set_rng_state(ranks[rank])
    return state, same_world


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _plain(obj):
    """timm scheduler state: drop anything that is not a plain value (weights_only must read it)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if _is_plain(v)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _is_plain(v) -> bool:
    if v is None or isinstance(v, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_is_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, (str, int)) and _is_plain(x) for k, x in v.items())
    return False
