"""A run, built once: its data, model, EMA, optimizer, schedule, loss and progress, from its config.

``build_run`` does everything the first step needs, in an order that keeps a resumed run's random
streams those of an uninterrupted one: output check, data (the classes size the head), model and
its weights, loaders, optimizer and schedule, loss, then the training checkpoint (``restore``),
then the DDP wrapper. ``engine/train.py`` steps it.
"""

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..checkpoint import read_checkpoint
from ..errors import UserError
from . import builders
from . import state as st
from .config import RunConfig, diff
from .distributed import DistEnv, barrier, broadcast_object
from .records import RUN_FILES, Records, write_config

# what an invocation did rather than what the run is: not part of the saved config, not a change on resume
INVOCATION_KEYS = ('resume', 'overwrite', 'stop_after_epochs', 'output', 'progress', 'workers')
# data.train_transform's keyword arguments, all from the config
TRAIN_TRANSFORM_KEYS = ('scale', 'ratio', 'hflip', 'color_jitter', 'auto_augment', 'train_interpolation',
                        'reprob', 'remode', 'crop_pct')


@dataclass
class RunData:
    class_names: List[str]
    train_ds: Any
    val_ds: Any
    train_sampler: Any
    train_loader: Any
    val_loader: Any
    batches_per_epoch: int


@dataclass
class Run:
    cfg: RunConfig  # resolved: image size, preprocessing and model_kwargs filled in
    config: Dict[str, Any]  # what config.yaml and every checkpoint hold
    env: DistEnv
    say: Callable[[str], None]
    data: RunData
    model: nn.Module
    train_model: nn.Module  # ``model`` inside DistributedDataParallel when there is more than one process
    ema: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    autocast: Callable[[], Any]
    precision: str
    mixup: Any
    loss_fn: Callable  # (inputs, outputs, targets) -> loss
    plan: builders.EpochPlan
    state: st.TrainState
    resume_path: Optional[Path] = None
    rng_restored: bool = False

    @property
    def out(self) -> Path:
        return Path(self.cfg.output)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.env.world_size

    @property
    def max_failed(self) -> float:
        """Undecodable training images tolerated before the run stops: 1% of this rank's share."""
        return 0.01 * max(len(self.data.train_sampler), 1)


def build_run(cfg: RunConfig, env: DistEnv, say: Callable[[str], None]) -> Run:
    """Everything a run needs before its first step; a resumed run comes back as it was saved."""
    from timm.utils import ModelEmaV3

    from .. import data as D

    resume_path = _resume_path(cfg, say)
    problem = _output_problem(Path(cfg.output), resume_path is not None, cfg.overwrite) if env.is_main else None
    problem = broadcast_object(problem, env)
    if problem:
        raise UserError(problem)
    train_images, val_images = D.training_images(cfg.dataset, cfg.data, run_img_size(cfg),
                                                    val_split=cfg.val_split, seed=cfg.seed)
    class_names = list(train_images.classes)
    ckpt = st.read_training_checkpoint(resume_path, cfg.model, class_names) if resume_path else None
    model, cfg = _build_model(cfg, len(class_names), ckpt)
    data = _build_data(cfg, env, train_images, val_images, class_names, say)
    model.to(env.device)
    plan = builders.epoch_plan(cfg)
    ema_decay = builders.ema_decay(cfg.model_ema_decay, cfg.model_ema_horizon, plan.epochs * data.batches_per_epoch)
    ema = ModelEmaV3(model, decay=ema_decay, use_warmup=cfg.model_ema_warmup) if cfg.model_ema else None
    optimizer = builders.build_optimizer(model, cfg, builders.scaled_lr(cfg.lr, cfg.batch_size * env.world_size,
                                                                         cfg.lr_base_size))
    amp = builders.autocast_pays(env.device) if cfg.amp is None else cfg.amp  # unset: where it is faster
    autocast, amp_dtype, scaler = builders.autocast_setup(env.device, amp, cfg.amp_dtype)
    mixup = builders.build_mixup(cfg, len(class_names))
    config = {**cfg.to_dict(), 'resume': None, 'overwrite': False}
    run = Run(cfg, config, env, say, data, model, model, ema, optimizer,
              builders.build_scheduler(optimizer, cfg, data.batches_per_epoch, plan), scaler, autocast,
              'fp32' if amp_dtype is None else str(amp_dtype).replace('torch.', ''), mixup,
              _build_loss(cfg, mixup, len(class_names), env), plan, st.TrainState(), resume_path)
    if ckpt is not None:
        restore(run, ckpt)
    if not run.rng_restored:
        st.seed_everything(cfg.seed + env.rank + 1000 * run.state.epoch)
    if env.distributed:
        device = env.device
        run.train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    if cfg.compile:
        # the compiled module shares ``model``'s parameters: optimizer, EMA and checkpoints see the same tensors
        run.train_model = torch.compile(run.train_model)
    return run


def run_img_size(cfg: RunConfig) -> int:
    """The size the run trains at: --img-size, else model_kwargs' img_size, else the model's pretrained_cfg."""
    import timm

    from ..factory import UnknownModelError, list_models

    if cfg.img_size:
        return int(cfg.img_size)
    if 'img_size' in cfg.model_kwargs:
        return int(cfg.model_kwargs['img_size'])
    if cfg.model not in list_models():
        raise UserError(str(UnknownModelError(cfg.model, list_models())))
    return int(timm.models.get_pretrained_cfg(cfg.model).input_size[-1])


def _build_model(cfg: RunConfig, num_classes: int, resume: Optional[Dict[str, Any]]) -> Tuple[nn.Module, RunConfig]:
    """The model with its starting weights (the same on every rank), and ``cfg`` with what it resolved."""
    st.seed_everything(cfg.seed)
    arch = {**cfg.model_kwargs, 'img_size': run_img_size(cfg), 'num_classes': num_classes}
    regularisation = {'drop_rate': cfg.drop_rate, 'drop_path_rate': cfg.drop_path}
    if cfg.checkpoint and resume is None:  # fine-tuning: the pretrained file's architecture and weights
        model, arch = builders.finetune_model(cfg.model, read_checkpoint(cfg.checkpoint), arch, regularisation)
    else:
        if cfg.checkpoint:  # resuming a fine-tune: the weights come from ``resume``, the architecture too
            saved = (resume.get('config') or {}).get('model_kwargs') or {}
            arch = {**{k: v for k, v in saved.items() if k not in ('img_size', 'num_classes')}, **arch}
        model = builders.build_model(cfg.model, **regularisation, **arch)
    if cfg.grad_checkpointing:
        if not hasattr(model, 'set_grad_checkpointing'):
            raise UserError(f'--grad-checkpointing: {cfg.model} does not support gradient checkpointing')
        model.set_grad_checkpointing(True)
    if hasattr(model, 'set_lean_activations'):  # t2tvit's models; other timm models train plainly
        model.set_lean_activations(cfg.activations == 'lean')
    return model, dataclasses.replace(cfg, **builders.data_settings(model, cfg), model_kwargs=arch)


def _build_data(cfg: RunConfig, env: DistEnv, train_images, val_images, class_names: List[str],
                say: Callable[[str], None]) -> RunData:
    from .. import data as D

    transform = D.train_transform(cfg.augment, cfg.img_size, cfg.mean, cfg.std, cfg.interpolation,
                                  **{k: getattr(cfg, k) for k in TRAIN_TRANSFORM_KEYS})
    # uint8 across the loader, normalised (and erased) on the device: the same tensors, a quarter of the bytes
    train_ds = D.AugmentedDataset(train_images, D.StagedTransform.split(transform) or transform, seed=cfg.seed)
    val_ds = D.AugmentedDataset(
        val_images, D.eval_transform(cfg.img_size, cfg.mean, cfg.std, cfg.crop_pct, cfg.interpolation), seed=cfg.seed)
    if cfg.batch_size * env.world_size > len(train_ds):
        procs = f' x {env.world_size} processes' if env.distributed else ''
        raise UserError(
            f'batch size {cfg.batch_size}{procs} is larger than the training set ({len(train_ds)} '
            f'images); use -b {max(1, len(train_ds) // env.world_size)} or less')
    sampler = D.EpochSampler(train_ds, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed,
                             groups=D.shard_groups(train_images))
    pin = env.device.type == 'cuda'
    if cfg.cache_images:
        return _memory_data(cfg, env, train_images, val_images, class_names, sampler, say)
    train_loader = D.make_loader(train_ds, cfg.batch_size, sampler, cfg.workers, drop_last=True, pin_memory=pin,
                                 seed=cfg.seed)
    val_loader = D.make_loader(val_ds, cfg.batch_size, D.ShardSampler(len(val_ds), env.world_size, env.rank),
                               cfg.workers, pin_memory=pin, seed=cfg.seed)
    return RunData(class_names, train_ds, val_ds, sampler, train_loader, val_loader, len(sampler) // cfg.batch_size)


def _memory_data(cfg: RunConfig, env: DistEnv, train_images, val_images, class_names: List[str], sampler,
                 say: Callable[[str], None]) -> RunData:
    """``--cache-images``: every image decoded once (each rank holds them all), batches made in memory."""
    from .. import data as D

    start = time.perf_counter()
    prepare = D.memory_prepare(cfg.augment, cfg.img_size, cfg.mean, cfg.std, cfg.crop_pct, cfg.interpolation)
    train = D.DecodedImages(train_images, prepare, cfg.img_size, cfg.workers, 'the training images',
                            progress=cfg.progress and env.is_main)
    val = D.DecodedImages(val_images, D.memory_prepare('none', cfg.img_size, cfg.mean, cfg.std, cfg.crop_pct,
                                                       cfg.interpolation),
                          cfg.img_size, cfg.workers, 'the validation images', progress=cfg.progress and env.is_main)
    say(f'images in memory: {len(train)} training and {len(val)} validation images decoded once '
        f'({(train.nbytes + val.nbytes) / 2**20:.0f} MB uint8, {time.perf_counter() - start:.1f} s)')
    augment = (D.pad_crop_padding(cfg.img_size), cfg.hflip) if cfg.augment == 'pad-crop' else None
    train_loader = D.MemoryLoader(train, cfg.batch_size, sampler, cfg.mean, cfg.std, augment, drop_last=True,
                                  seed=cfg.seed)
    val_loader = D.MemoryLoader(val, cfg.batch_size, D.ShardSampler(len(val), env.world_size, env.rank),
                                cfg.mean, cfg.std)
    return RunData(class_names, train, val, sampler, train_loader, val_loader, len(sampler) // cfg.batch_size)


def _build_loss(cfg: RunConfig, mixup, num_classes: int, env: DistEnv) -> Callable:
    """``loss_fn(inputs, outputs, targets)``: the training loss, with the teacher's term when distilling."""
    base = builders.build_train_loss(cfg, mixup)
    if not cfg.teacher:
        return lambda x, y_hat, y: base(y_hat, y)
    teacher = builders.build_teacher(cfg.teacher, cfg.teacher_checkpoint, num_classes, env.device)
    return builders.DistillationLoss(base, teacher, cfg.distill, cfg.distill_alpha, cfg.distill_tau,
                                     builders.teacher_input_size(teacher))


def restore(run: Run, ckpt: Dict[str, Any]) -> None:
    """A training checkpoint back into ``run``: weights, EMA, optimizer, schedule, scaler, progress, RNG."""
    try:
        run.state, run.rng_restored = st.restore(
            ckpt, model=run.model, ema=run.ema, optimizer=run.optimizer, scheduler=run.scheduler,
            scaler=run.scaler, rank=run.env.rank, world_size=run.env.world_size)
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(
            f'--resume {run.resume_path}: does not fit this run ({str(e).strip().splitlines()[0][:160]})') from None
    state = run.state
    changed = diff(ckpt.get('config') or {}, run.config, ignore=list(INVOCATION_KEYS))
    where = f', {state.batches_done} batches into epoch {state.epoch + 1}' if state.batches_done else ''
    note = f'; config changed: {", ".join(changed)}' if changed else ''
    run.say(f'resumed from {run.resume_path}: {state.epoch} epoch(s) done{where}{note}')
    if not run.rng_restored:
        run.say('note: the checkpoint was written by a different number of processes; '
                'random streams restart, so the run will not match an uninterrupted one bit for bit')


def open_output(run: Run) -> Records:
    """Rank 0 writes OUTPUT/config.yaml (after clearing the old run under --overwrite); every rank waits."""
    if run.env.is_main:
        if run.resume_path is None and run.cfg.overwrite:
            for f in RUN_FILES:
                (run.out / f).unlink(missing_ok=True)
            shutil.rmtree(run.out / 'tensorboard', ignore_errors=True)
        run.out.mkdir(parents=True, exist_ok=True)
        write_config(run.out, run.config)
    barrier(run.env)
    return Records(run.out, run.env.is_main, completed_epochs=run.state.epoch)


def _resume_path(cfg: RunConfig, say: Callable[[str], None]) -> Optional[Path]:
    if not cfg.resume:
        return None
    if cfg.resume == 'auto':
        path = Path(cfg.output) / 'last.pth'
        if not path.is_file():
            say(f'note: --resume auto found no {path}; starting a new run')
            return None
        return path
    if not Path(cfg.resume).is_file():
        raise UserError(f'--resume {cfg.resume}: no such checkpoint file')
    return Path(cfg.resume)


def _output_problem(out: Path, resuming: bool, overwrite: bool) -> Optional[str]:
    """None when ``out`` may be written; otherwise the error line (rank 0 decides for every rank)."""
    if out.exists() and not out.is_dir():
        return f'--output {out}: exists and is not a folder'
    held = [f for f in RUN_FILES if (out / f).exists()] if out.is_dir() else []
    if held and not resuming and not overwrite:
        return (f'--output {out} already holds a run ({", ".join(held)}); pass --resume auto to continue it '
                f'or --overwrite to replace it')
    return None
