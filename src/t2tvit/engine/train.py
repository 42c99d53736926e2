"""Training: ``train_one_epoch`` (the step loop) and ``fit`` (a whole run: build, resume, loop, save).

``fit`` is what ``t2tvit train`` and ``t2tvit finetune`` run, in one process or in each process
of a torchrun job. Rank 0 writes every file; every rank holds the same model and EMA (DDP
averages the gradients, the EMA is updated from identical weights). A run stops cleanly on
SIGINT/SIGTERM (at the end of the current step, ``last.pth`` written), after
``stop_after_epochs`` epochs, or after 20 non-finite losses in a row (no checkpoint written, the
last good one kept).
"""

import contextlib
import dataclasses
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from tqdm import tqdm

from ..checkpoint import read_checkpoint
from ..errors import UserError
from . import builders
from . import state as st
from .config import RunConfig, diff
from .distributed import (
    DistEnv,
    all_reduce,
    barrier,
    broadcast_object,
    gather_objects,
    init_distributed,
    shutdown,
)
from .evaluate import check_failures, evaluate
from .records import RUN_FILES, Records, write_config

MAX_NONFINITE_IN_ROW = 20


class Interrupted(Exception):
    """SIGINT/SIGTERM: ``last.pth`` holds the state at the end of the last step; exit 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path, epoch: int, batches_done: Optional[int]):
        """``batches_done`` of (0-based) ``epoch``; None: stopped between epochs, ``epoch`` of them done."""
        self.signum = signum
        self.exit_code = 128 + signum
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        if batches_done is None:
            where = f'after epoch {epoch}'
        else:
            where = f'in epoch {epoch + 1}' + (f' after {batches_done} batches' if batches_done else '')
        super().__init__(f'interrupted by {name} {where}: state saved to {checkpoint}')


class TrainingDiverged(UserError):
    exit_code = 1


@dataclass
class FitResult:
    output: Path
    epochs_done: int
    total_epochs: int
    best_metric: Optional[float]
    best_epoch: Optional[int]
    last_metrics: Dict[str, Any]
    stopped_early: bool = False  # stop_after_epochs ended this invocation before the schedule's end

    @property
    def finished(self) -> bool:
        return self.epochs_done >= self.total_epochs


class StopSignals:
    """SIGINT/SIGTERM set a flag read at the end of each step; a second SIGINT stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    device: torch.device,
    state: st.TrainState,
    env: DistEnv,
    total_batches: int,
    scheduler=None,
    ema=None,
    scaler=None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    mixup=None,
    clip_grad: Optional[float] = None,
    max_failed: float = float('inf'),
    should_stop: Callable[[], int] = lambda: 0,
    progress: bool = False,
    desc: str = 'train',
) -> Dict[str, Any]:
    """One epoch from batch ``state.batches_done`` on; updates ``state`` after every step.

    ``loss_fn(inputs, outputs, targets)``. Returns the running loss, the throughput and ``stopped``
    (the signal number, 0 when the epoch ran to its end).
    """
    model.train()
    unwrapped = model.module if hasattr(model, 'module') else model
    bar = tqdm(
        total=total_batches,
        initial=state.batches_done,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=not (progress and env.is_main),
        mininterval=0.5,
    )
    stopped = 0
    start = time.perf_counter() - state.seconds
    for images, targets, failed in loader:
        state.failed_count += len(failed)
        state.failed += failed[: max(0, 5 - len(state.failed))]
        if mixup is not None and len(images) % 2:
            images, targets = images[:-1], targets[:-1]  # mixup pairs images: keep an even batch
        empty = images.numel() == 0
        nonfinite = False
        if not empty:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if mixup is not None:
                images, targets = mixup(images, targets)
            with autocast():
                outputs = model(images)
                loss = loss_fn(images, outputs, targets)
            nonfinite = not bool(torch.isfinite(loss).item())
        # every rank takes the same decision: skip the step, stop after it, abort for unreadable data
        flags = torch.tensor(
            [float(empty), float(nonfinite), float(should_stop()), float(state.failed_count > max_failed)],
            device=device,
        )
        all_reduce(flags, env, op=torch.distributed.ReduceOp.MAX)
        skip = bool(flags[0].item() or flags[1].item())
        if skip:
            if env.distributed and not empty:
                (loss * 0).backward()  # DDP expects every rank's backward; the gradients are thrown away
            optimizer.zero_grad(set_to_none=True)
        else:
            if scaler is not None:
                scaler.scale(loss).backward()
                if clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            if ema is not None:
                ema.update(unwrapped, step=state.step)
            if scheduler is not None:
                scheduler.step_update(state.step)
            state.loss_sum += loss.item() * len(images)
            state.samples += len(images)
        if flags[1].item():
            state.nonfinite_in_row += 1
            state.nonfinite_total += 1
            if state.nonfinite_in_row >= MAX_NONFINITE_IN_ROW:
                bar.close()
                raise TrainingDiverged(
                    f'the loss was not finite for {MAX_NONFINITE_IN_ROW} steps in a row (step {state.step}); '
                    'stopped, the last good checkpoint is kept: '
                    'try a lower --lr, --clip-grad, or --no-amp (fp32)'
                )
        elif not empty:
            state.nonfinite_in_row = 0
        state.batches_done += 1
        state.seconds = time.perf_counter() - start
        bar.update(1)
        if progress and env.is_main and state.samples:
            lr = max(g['lr'] for g in optimizer.param_groups)
            bar.set_postfix_str(
                f'loss {state.loss_sum / state.samples:.4f}  lr {lr:.3g}  '
                f'{state.samples * env.world_size / max(state.seconds, 1e-9):.0f} img/s',
                refresh=False,
            )
        if flags[3].item():
            bar.close()
            raise UserError(
                f'more than 1% of the training images failed to decode (first: '
                f'{", ".join(state.failed[:3])}); fix or remove them'
            )
        if flags[2].item():
            stopped = int(flags[2].item())
            break
    bar.close()
    return {
        'loss': state.loss_sum / max(state.samples, 1),
        'img_per_s': state.samples * env.world_size / max(state.seconds, 1e-9),
        'seconds': state.seconds,
        'stopped': stopped,
    }


# -- a whole run ---------------------------------------------------------------------------------------------
def _resolve_resume(cfg: RunConfig, out: Path, say) -> Optional[Path]:
    if not cfg.resume:
        return None
    if cfg.resume == 'auto':
        path = out / 'last.pth'
        if not path.is_file():
            say(f'note: --resume auto found no {path}; starting a new run')
            return None
        return path
    path = Path(cfg.resume)
    if not path.is_file():
        raise UserError(f'--resume {cfg.resume}: no such checkpoint file')
    return path


def _check_output(out: Path, resuming: bool, overwrite: bool) -> Optional[str]:
    """None when ``out`` may be written; otherwise the error line (rank 0 decides for every rank)."""
    if out.exists() and not out.is_dir():
        return f'--output {out}: exists and is not a folder'
    held = [f for f in RUN_FILES if (out / f).exists()] if out.is_dir() else []
    if held and not resuming and not overwrite:
        return (
            f'--output {out} already holds a run ({", ".join(held)}); pass --resume auto to continue it '
            f'or --overwrite to replace it'
        )
    return None


def _clear_output(out: Path) -> None:
    """--overwrite: the previous run's files go once the new run has been built without error."""
    for f in RUN_FILES:
        if (out / f).exists():
            (out / f).unlink()
    shutil.rmtree(out / 'tensorboard', ignore_errors=True)


def _default_img_size(name: str, cfg: RunConfig) -> int:
    import timm

    from ..factory import UnknownModelError, list_models

    if cfg.img_size:
        return int(cfg.img_size)
    if 'img_size' in cfg.model_kwargs:
        return int(cfg.model_kwargs['img_size'])
    if name not in list_models():
        raise UserError(str(UnknownModelError(name, list_models())))
    return int(timm.models.get_pretrained_cfg(name).input_size[-1])


def _load_resume(path: Path, cfg: RunConfig, class_names: List[str]) -> Dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'--resume {path}: not a readable checkpoint ({type(e).__name__})') from None
    if not isinstance(ckpt, dict) or ckpt.get('format') != st.TRAIN_FORMAT:
        raise UserError(
            f'--resume {path}: not a training checkpoint of this project (to start from other '
            f'weights use t2tvit finetune --checkpoint)'
        )
    trained = (ckpt.get('config') or {}).get('model')
    if trained != cfg.model:
        raise UserError(f'--resume {path}: the checkpoint is for model {trained}, this run is {cfg.model}')
    if list(ckpt.get('class_names') or []) != list(class_names):
        raise UserError(
            f'--resume {path}: the checkpoint was trained on other classes than this data '
            f'({len(ckpt.get("class_names") or [])} vs {len(class_names)})'
        )
    return ckpt


# below this many training images a paper-size ViT trained from random weights rarely gets past chance:
# it has none of a CNN's built-in locality to fall back on. The paper's smallest, T2T-ViT-7, is 4.0M
# parameters without its ImageNet head; the demo's 0.7M t2t_vit_lite_32 does learn the 1,437 digits.
SMALL_DATA_IMAGES = 5000
PAPER_SCALE_PARAMS = 2_000_000


def small_data_note(n_images: int, n_params: int, model: str) -> Optional[str]:
    """One line for a from-scratch run of a paper-size model on little data, else None."""
    if n_images >= SMALL_DATA_IMAGES or n_params < PAPER_SCALE_PARAMS:
        return None
    return (
        f'note: a ViT of {n_params / 1e6:.1f}M parameters trained from scratch on {n_images} images rarely '
        f'learns (the paper trains on 1.28M); start from ImageNet weights instead: '
        f't2tvit finetune DATA --model {model} --pretrained'
    )


def fit(cfg: RunConfig, log: Callable[[str], None] = print) -> FitResult:
    """Train (or fine-tune, when ``cfg.checkpoint`` gives pretrained weights) as ``cfg`` says."""
    from timm.utils import ModelEmaV3

    from .. import data as D

    env = init_distributed(cfg.device)
    try:
        return _fit(cfg, env, log if env.is_main else (lambda *_: None), ModelEmaV3, D)
    finally:
        shutdown(env)


def _fit(cfg: RunConfig, env: DistEnv, say, ModelEmaV3, D) -> FitResult:
    device = env.device
    out = Path(cfg.output)
    resume_path = _resolve_resume(cfg, out, say)
    problem = _check_output(out, resume_path is not None, cfg.overwrite) if env.is_main else None
    problem = broadcast_object(problem, env)
    if problem:
        raise UserError(problem)

    # data first: the classes size the head
    img_size = _default_img_size(cfg.model, cfg)
    train_images, val_images = D.training_images(cfg.dataset, cfg.data, img_size)
    class_names = list(train_images.classes)
    num_classes = len(class_names)
    resume_ckpt = _load_resume(resume_path, cfg, class_names) if resume_path is not None else None

    # the model: same initial weights on every rank
    st.seed_everything(cfg.seed)
    pretrained = read_checkpoint(cfg.checkpoint) if cfg.checkpoint else None
    model_kwargs = {**cfg.model_kwargs, 'img_size': img_size, 'num_classes': num_classes}
    regularisation = {'drop_rate': cfg.drop_rate, 'drop_path_rate': cfg.drop_path}
    if pretrained is not None:  # a resumed run restores its own weights
        model, model_kwargs = builders.finetune_model(
            cfg.model, pretrained, model_kwargs, regularisation, load=resume_path is None
        )
    else:
        model = builders.build_model(cfg.model, **regularisation, **model_kwargs)
    if cfg.grad_checkpointing:
        if not hasattr(model, 'set_grad_checkpointing'):
            raise UserError(f'--grad-checkpointing: {cfg.model} does not support gradient checkpointing')
        model.set_grad_checkpointing(True)
    if hasattr(model, 'set_lean_activations'):  # t2tvit's models; other timm models train plainly
        model.set_lean_activations(cfg.activations == 'lean')
    from_pretrained = pretrained is not None
    del pretrained
    pre = builders.data_settings(model, cfg)
    cfg = dataclasses.replace(
        cfg,
        img_size=pre['img_size'],
        mean=pre['mean'],
        std=pre['std'],
        crop_pct=pre['crop_pct'],
        interpolation=pre['interpolation'],
        model_kwargs=model_kwargs,
    )
    config = cfg.to_dict()
    config.update(resume=None, overwrite=False)  # what this invocation did, not part of the run

    train_ds = D.AugmentedDataset(
        train_images,
        D.train_transform(
            cfg.augment,
            cfg.img_size,
            cfg.mean,
            cfg.std,
            cfg.interpolation,
            scale=cfg.scale,
            ratio=cfg.ratio,
            hflip=cfg.hflip,
            color_jitter=cfg.color_jitter,
            auto_augment=cfg.auto_augment,
            train_interpolation=cfg.train_interpolation,
            reprob=cfg.reprob,
            remode=cfg.remode,
            crop_pct=cfg.crop_pct,
        ),
        seed=cfg.seed,
    )
    val_ds = D.AugmentedDataset(
        val_images,
        D.eval_transform(cfg.img_size, cfg.mean, cfg.std, cfg.crop_pct, cfg.interpolation),
        seed=cfg.seed,
    )
    global_batch = cfg.batch_size * env.world_size
    if global_batch > len(train_ds):
        procs = f' x {env.world_size} processes' if env.distributed else ''
        raise UserError(
            f'batch size {cfg.batch_size}{procs} is larger than the training set ({len(train_ds)} '
            f'images); use -b {max(1, len(train_ds) // env.world_size)} or less'
        )
    train_sampler = D.EpochSampler(
        train_ds, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed
    )
    pin = device.type == 'cuda'
    train_loader = D.make_loader(
        train_ds, cfg.batch_size, train_sampler, cfg.workers, drop_last=True, pin_memory=pin, seed=cfg.seed
    )
    val_loader = D.make_loader(
        val_ds,
        cfg.batch_size,
        D.ShardSampler(len(val_ds), env.world_size, env.rank),
        cfg.workers,
        pin_memory=pin,
        seed=cfg.seed,
    )
    batches_per_epoch = len(train_sampler) // cfg.batch_size

    model.to(device)
    ema = (
        ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)
        if cfg.model_ema
        else None
    )
    lr = builders.scaled_lr(cfg.lr, global_batch, cfg.lr_base_size)
    optimizer = builders.build_optimizer(model, cfg, lr)
    plan = builders.epoch_plan(cfg)
    scheduler = builders.build_scheduler(optimizer, cfg, batches_per_epoch, plan)
    total_epochs = plan.epochs
    autocast, amp_dtype, scaler = builders.autocast_setup(device, cfg.amp, cfg.amp_dtype)
    mixup = builders.build_mixup(cfg, num_classes)
    base_loss = builders.build_train_loss(cfg, mixup)
    if cfg.teacher:
        teacher = builders.build_teacher(cfg.teacher, cfg.teacher_checkpoint, num_classes, device)
        distill = builders.DistillationLoss(
            base_loss,
            teacher,
            cfg.distill,
            cfg.distill_alpha,
            cfg.distill_tau,
            builders.teacher_input_size(teacher),
        )

        def loss_fn(x, y_hat, y):
            return distill(x, y_hat, y)
    else:

        def loss_fn(x, y_hat, y):
            return base_loss(y_hat, y)

    state = st.TrainState()
    rng_restored = False
    if resume_ckpt is not None:
        ckpt, resume_ckpt = resume_ckpt, None
        changed = diff(
            ckpt.get('config') or {},
            config,
            ignore=['resume', 'overwrite', 'stop_after_epochs', 'output', 'progress', 'workers'],
        )
        try:
            state, rng_restored = st.restore(
                ckpt,
                model=model,
                ema=ema,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                rank=env.rank,
                world_size=env.world_size,
            )
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(
                f'--resume {resume_path}: does not fit this run ({str(e).strip().splitlines()[0][:160]})'
            ) from None
        del ckpt
        where = f', {state.batches_done} batches into epoch {state.epoch + 1}' if state.batches_done else ''
        note = f'; config changed: {", ".join(changed)}' if changed else ''
        say(f'resumed from {resume_path}: {state.epoch} epoch(s) done{where}{note}')
        if not rng_restored:
            say(
                'note: the checkpoint was written by a different number of processes; '
                'random streams restart, so the run will not match an uninterrupted one bit for bit'
            )
    if not rng_restored:
        st.seed_everything(cfg.seed + env.rank + 1000 * state.epoch)

    train_model = model
    if env.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None
        )

    if env.is_main:
        if resume_path is None and cfg.overwrite:
            _clear_output(out)
        out.mkdir(parents=True, exist_ok=True)
        write_config(out, config)
    barrier(env)
    records = Records(out, env.is_main, completed_epochs=state.epoch)
    n_params = sum(p.numel() for p in model.parameters())
    precision = 'fp32' if amp_dtype is None else str(amp_dtype).replace('torch.', '')
    say(
        f'training {cfg.model} ({n_params / 1e6:.2f}M params, {cfg.img_size}px) on {len(train_ds)} images of '
        f'{num_classes} classes, validating on {len(val_ds)}; {builders.describe_schedule(cfg, plan)}; '
        f'{builders.describe_lr(cfg, global_batch)}; {env.world_size} process(es) x batch {cfg.batch_size}, '
        f'{device.type} {precision}; output {out}'
    )
    if not from_pretrained:
        note = small_data_note(len(train_ds), n_params, cfg.model)
        if note:
            say(note)

    result = FitResult(out, state.epoch, total_epochs, state.best_metric, state.best_epoch, {})
    epochs_this_run = 0
    max_failed = 0.01 * max(len(train_sampler), 1)
    with StopSignals() as signals, contextlib.closing(records):

        def save(is_best: bool = False):
            ckpt = st.checkpoint_dict(
                model=model,
                ema=ema,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                rng=gather_objects(st.rng_state(), env),
                state=state,
                config=config,
                class_names=class_names,
            )
            if env.is_main:
                st.save(ckpt, out / 'last.pth')
                if is_best:
                    st.save(ckpt, out / 'best.pth')
            barrier(env)

        for epoch in range(state.epoch, total_epochs):
            scheduler.step(epoch)
            scheduler.step_update(state.step)  # a no-op unless the schedule moves per step
            train_sampler.set_epoch(epoch)
            train_sampler.skip = state.batches_done * cfg.batch_size
            desc = f'epoch {epoch + 1}/{total_epochs}'
            if not state.eval_pending:
                tm = train_one_epoch(
                    train_model,
                    train_loader,
                    optimizer,
                    loss_fn,
                    device=device,
                    state=state,
                    env=env,
                    total_batches=batches_per_epoch,
                    scheduler=scheduler,
                    ema=ema,
                    scaler=scaler,
                    autocast=autocast,
                    mixup=mixup,
                    clip_grad=cfg.clip_grad,
                    max_failed=max_failed,
                    should_stop=lambda: signals.signum,
                    progress=cfg.progress,
                    desc=desc,
                )
                if tm['stopped']:
                    save()
                    raise Interrupted(tm['stopped'], out / 'last.pth', epoch, state.batches_done)
                state.eval_pending = True
            sums = all_reduce(
                torch.tensor(
                    [state.loss_sum, float(state.samples), float(state.failed_count)],
                    dtype=torch.float64,
                    device=device,
                ),
                env,
            )
            train_loss = sums[0].item() / max(sums[1].item(), 1)
            img_per_s = sums[1].item() / max(state.seconds, 1e-9)
            notes = [check_failures(int(sums[2].item()), len(train_ds), state.failed, 'training')]

            val = evaluate(
                model,
                val_loader,
                device,
                env=env,
                autocast=autocast,
                progress=cfg.progress,
                desc=f'{desc} val',
                should_stop=lambda: signals.signum,
            )
            ema_val = None
            if val is not None and ema is not None:
                ema_val = evaluate(
                    ema.module,
                    val_loader,
                    device,
                    env=env,
                    autocast=autocast,
                    progress=cfg.progress,
                    desc=f'{desc} val (EMA)',
                    should_stop=lambda: signals.signum,
                )
            if val is None or (ema is not None and ema_val is None):
                save()
                raise Interrupted(
                    signals.signum or signal.SIGTERM, out / 'last.pth', epoch, state.batches_done
                )
            notes.append(check_failures(val['failed_count'], len(val_ds), val['failed'], 'validation'))

            # best = the weights t2tvit.load_checkpoint serves by default (the EMA when there is one)
            metric = (ema_val or val)['top1']
            is_best = state.best_metric is None or metric > state.best_metric
            if is_best:
                state.best_metric, state.best_epoch = metric, epoch + 1
            lr_now = max(g['lr'] for g in optimizer.param_groups)
            epoch_seconds = state.seconds + val['seconds'] + (ema_val['seconds'] if ema_val else 0.0)
            row = {
                'epoch': epoch + 1,
                'lr': lr_now,
                'train_loss': train_loss,
                'val_loss': val['loss'],
                'top1': val['top1'],
                'top5': val['top5'],
                'img_per_s': img_per_s,
                'time': epoch_seconds,
                'ema_val_loss': ema_val['loss'] if ema_val else None,
                'ema_top1': ema_val['top1'] if ema_val else None,
                'ema_top5': ema_val['top5'] if ema_val else None,
            }
            state.epoch = epoch + 1
            state.start_epoch()
            records.add(row)
            if state.nonfinite_in_row:
                # inside a run of non-finite losses: keep the last good checkpoint rather than this state
                say(
                    f'note: epoch {epoch + 1} ended on {state.nonfinite_in_row} non-finite step(s) in a row; '
                    'last.pth not updated'
                )
            else:
                save(is_best)
            for note in notes:
                if note:
                    say(note)
            ema_part = f'  ema top1 {ema_val["top1"]:.2f}' if ema_val else ''
            skipped = f'  ({state.nonfinite_total} non-finite steps skipped)' if state.nonfinite_total else ''
            say(
                f'epoch {epoch + 1}/{total_epochs}  train loss {train_loss:.4f}  val loss {val["loss"]:.4f}  '
                f'top1 {val["top1"]:.2f}  top5 {val["top5"]:.2f}{ema_part}  lr {lr_now:.3g}  '
                f'{img_per_s:.0f} img/s  {epoch_seconds:.1f}s{"  *best*" if is_best else ""}{skipped}'
            )
            result = FitResult(out, state.epoch, total_epochs, state.best_metric, state.best_epoch, row)
            epochs_this_run += 1
            if signals.signum:
                raise Interrupted(signals.signum, out / 'last.pth', state.epoch, None)
            if (
                cfg.stop_after_epochs
                and epochs_this_run >= cfg.stop_after_epochs
                and state.epoch < total_epochs
            ):
                result.stopped_early = True
                break
    sys.stdout.flush()
    return result
