"""Training: ``train`` builds a run (``engine/run.py``) and ``fit`` steps it, epoch by epoch.

``train`` is what ``t2tvit train`` and ``t2tvit finetune`` run, in one process or in each process
of a torchrun job. Rank 0 writes every file; every rank holds the same model and EMA (DDP
averages the gradients, the EMA is updated from identical weights). A run stops cleanly on
SIGINT/SIGTERM/SIGUSR1 (at the end of the current step, ``last.pth`` written), after
``stop_after_epochs`` epochs, or after 20 non-finite losses in a row (no checkpoint written, the
last good one kept).
"""

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from ..errors import UserError
from . import state as st
from .distributed import all_reduce, barrier, gather_objects, init_distributed, shutdown
from .evaluate import check_failures, evaluate
from .records import Records
from .run import Run, build_run, open_output

MAX_NONFINITE_IN_ROW = 20


class Interrupted(Exception):
    """SIGINT/SIGTERM/SIGUSR1: ``last.pth`` holds the state at the end of the last step; exit 128 + signal."""

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
    best_kept: Optional[str] = None  # 'model' or 'ema': the weights behind best_metric, the ones best.pth serves
    stopped_early: bool = False  # stop_after_epochs ended this invocation before the schedule's end

    @property
    def finished(self) -> bool:
        return self.epochs_done >= self.total_epochs


class StopSignals:
    """SIGINT/SIGTERM/SIGUSR1 set a flag read at the end of each step; a second SIGINT stops at once.

    SIGUSR1 is what a cluster sends before it preempts a job (SLURM's ``--signal=USR1@90``); under torchrun
    every rank's flag goes into the step's one all-reduce, so all ranks stop after the same step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


# -- a whole run ---------------------------------------------------------------------------------------------
def train(cfg, log: Callable[[str], None] = print) -> FitResult:
    """Train (or fine-tune, when ``cfg.checkpoint`` gives pretrained weights) as ``cfg`` says."""
    env = init_distributed(cfg.device)
    try:
        return fit(build_run(cfg, env, log if env.is_main else (lambda *_: None)))
    finally:
        shutdown(env)


INTERRUPTED_FILE = 'INTERRUPTED'


@contextlib.contextmanager
def _marking_interruptions(run: Run):
    """``OUTPUT/INTERRUPTED`` (rank 0) while a run stopped by a signal waits to be resumed: a requeue
    script tests for it (README, "Many machines and failures"); a run that goes on removes it."""
    marker = run.out / INTERRUPTED_FILE
    if run.env.is_main:
        marker.unlink(missing_ok=True)
    try:
        yield
    except Interrupted as e:
        if run.env.is_main:
            marker.write_text(f'{e}\n')
        raise


def fit(run: Run) -> FitResult:
    """Epochs from where ``run`` stands to the end of its schedule (or ``stop_after_epochs`` of them)."""
    state, total = run.state, run.plan.epochs
    result = FitResult(run.out, state.epoch, total, state.best_metric, state.best_epoch, {}, state.best_kept)
    with StopSignals() as signals, contextlib.closing(open_output(run)) as records, _marking_interruptions(run):
        announce(run)
        for done_here, epoch in enumerate(range(state.epoch, total), 1):
            desc = f'epoch {epoch + 1}/{total}'
            run.scheduler.step(epoch)
            run.scheduler.step_update(state.step)  # a no-op unless the schedule moves per step
            if not state.eval_pending:
                stopped = train_epoch(run, epoch, lambda: signals.signum, desc)
                if stopped:
                    save(run)
                    raise Interrupted(stopped, run.out / 'last.pth', epoch, state.batches_done)
                state.eval_pending = True
            row, notes = evaluate_epoch(run, epoch, lambda: signals.signum, desc)
            end_epoch(run, records, row, notes)
            result = FitResult(run.out, state.epoch, total, state.best_metric, state.best_epoch, row, state.best_kept)
            if signals.signum:
                raise Interrupted(signals.signum, run.out / 'last.pth', state.epoch, None)
            if run.cfg.stop_after_epochs and done_here >= run.cfg.stop_after_epochs and state.epoch < total:
                result.stopped_early = True
                break
    sys.stdout.flush()
    return result


def announce(run: Run) -> None:
    """The run's start line, and the small-data note for a paper-size model trained from scratch."""
    from .builders import describe_lr, describe_schedule

    cfg, data, env = run.cfg, run.data, run.env
    n_params = sum(p.numel() for p in run.model.parameters())
    run.say(
        f'training {cfg.model} ({n_params / 1e6:.2f}M params, {cfg.img_size}px) on {len(data.train_ds)} images of '
        f'{len(data.class_names)} classes, validating on {len(data.val_ds)}{held_out(data)}; '
        f'{describe_schedule(cfg, run.plan)}; '
        f'{describe_lr(cfg, run.global_batch)}; {describe_ema(run)}{env.world_size} process(es) x batch '
        f'{cfg.batch_size}, '
        f'{env.device.type} {run.precision}; output {run.out}'
    )
    note = None if cfg.checkpoint else small_data_note(len(data.train_ds), n_params, cfg.model)
    if note:
        run.say(note)


def held_out(data) -> str:
    """`` (0.1 of DATA held out (seed 42))`` when the run validates on a share of its training images."""
    from ..data import held_out_description

    described = held_out_description(data.val_ds.images)
    return f' ({described})' if described else ''


def describe_ema(run: Run) -> str:
    """``EMA decay D (horizon N steps, of M); `` for the start line, '' without an EMA."""
    if run.ema is None:
        return ''
    total = run.plan.epochs * run.data.batches_per_epoch
    lowered = (f', lowered from {run.cfg.model_ema_decay:g} to fit the run'
               if run.ema.decay < run.cfg.model_ema_decay else '')
    warmup = ', warm-up' if run.cfg.model_ema_warmup else ''
    horizon = 1 / max(1 - run.ema.decay, 1e-12)
    return f'EMA decay {run.ema.decay:.6g} (horizon {horizon:,.0f} of {total:,} steps{lowered}{warmup}); '


def save(run: Run, is_best: bool = False, kept: Optional[str] = None) -> None:
    """``last.pth`` (and ``best.pth``) from rank 0, with every rank's RNG state; ``kept``: the weights the files
    serve by default ('model' or 'ema', whichever validated better; None: the EMA when there is one)."""
    ckpt = st.checkpoint_dict(
        model=run.model, ema=run.ema, optimizer=run.optimizer, scheduler=run.scheduler, scaler=run.scaler,
        rng=gather_objects(st.rng_state(), run.env), state=run.state, config=run.config,
        class_names=run.data.class_names, kept=kept)
    if run.env.is_main:
        st.save(ckpt, run.out / 'last.pth')
        if is_best:
            st.save(ckpt, run.out / 'best.pth')
    barrier(run.env)


# -- one epoch of training -----------------------------------------------------------------------------------
def train_epoch(run: Run, epoch: int, should_stop: Callable[[], int], desc: str = 'train') -> int:
    """Epoch ``epoch`` from batch ``state.batches_done`` on, ``state`` updated after every step.

    Returns the signal that stopped it at the end of a step, 0 when it ran to its end.
    """
    state = run.state
    run.data.train_sampler.set_epoch(epoch)
    run.data.train_sampler.skip = state.batches_done * run.cfg.batch_size
    run.train_model.train()
    bar = tqdm(total=run.data.batches_per_epoch, initial=state.batches_done, desc=desc, leave=False,
               dynamic_ncols=True, disable=not (run.cfg.progress and run.env.is_main), mininterval=0.5)
    start = time.perf_counter() - state.seconds
    with contextlib.closing(bar):
        for images, targets, failed in run.data.train_loader:
            state.failed_count += len(failed)
            state.failed += failed[: max(0, 5 - len(state.failed))]
            empty, nonfinite, stop, too_many_failed = train_step(run, images, targets, should_stop)
            count_nonfinite(state, nonfinite, empty)
            state.batches_done += 1
            state.seconds = time.perf_counter() - start
            show_progress(run, bar)
            if too_many_failed:
                raise UserError(f'more than 1% of the training images failed to decode (first: '
                                f'{", ".join(state.failed[:3])}); fix or remove them')
            if stop:
                return stop
    return 0


def train_step(run: Run, images, targets, should_stop) -> Tuple[bool, bool, int, bool]:
    """Forward, then every rank takes the same decision: skip the step, stop after it, abort for unreadable data.

    Returns (this batch was empty, some rank's loss was not finite, the stop signal, too many images failed).
    """
    if run.mixup is not None and len(images) % 2:
        images, targets = images[:-1], targets[:-1]  # mixup pairs images: keep an even batch
    empty, loss = images.numel() == 0, None
    if not empty:
        images = images.to(run.env.device, non_blocking=True)
        targets = targets.to(run.env.device, non_blocking=True)
        if run.mixup is not None:
            images, targets = run.mixup(images, targets)
        with run.autocast():
            loss = run.loss_fn(images, run.train_model(images), targets)
    loss_value = None if loss is None else loss.item()  # the step's one read of the loss
    nonfinite = loss_value is not None and not math.isfinite(loss_value)
    flags = torch.tensor([float(empty), float(nonfinite), float(should_stop()),
                          float(run.state.failed_count > run.max_failed)], device=run.env.device)
    all_reduce(flags, run.env, op=torch.distributed.ReduceOp.MAX)
    any_empty, any_nonfinite, stop, too_many_failed = flags.tolist()  # one read of every rank's decision
    if any_empty or any_nonfinite:
        if run.env.distributed and not empty:
            (loss * 0).backward()  # DDP expects every rank's backward; the gradients are thrown away
        run.optimizer.zero_grad(set_to_none=True)
    else:
        optimizer_step(run, loss)
        run.state.loss_sum += loss_value * len(images)
        run.state.samples += len(images)
    return empty, bool(any_nonfinite), int(stop), bool(too_many_failed)


def optimizer_step(run: Run, loss: torch.Tensor) -> None:
    """Backward (scaled for fp16), clip, step; then the EMA and a per-step schedule follow."""
    optimizer, scaler, clip = run.optimizer, run.scaler, run.cfg.clip_grad
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(run.train_model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(run.train_model.parameters(), clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    run.state.step += 1
    if run.ema is not None:
        run.ema.update(run.model, step=run.state.step)
    run.scheduler.step_update(run.state.step)


def count_nonfinite(state: st.TrainState, nonfinite: bool, empty: bool) -> None:
    """A step skipped for a non-finite loss (on any rank) counts; 20 in a row end the run."""
    if not nonfinite:
        if not empty:
            state.nonfinite_in_row = 0
        return
    state.nonfinite_in_row += 1
    state.nonfinite_total += 1
    if state.nonfinite_in_row >= MAX_NONFINITE_IN_ROW:
        raise TrainingDiverged(
            f'the loss was not finite for {MAX_NONFINITE_IN_ROW} steps in a row (step {state.step}); '
            'stopped, the last good checkpoint is kept: try a lower --lr, --clip-grad, or --no-amp (fp32)')


def show_progress(run: Run, bar) -> None:
    state, env = run.state, run.env
    bar.update(1)
    if run.cfg.progress and env.is_main and state.samples:
        lr = max(g['lr'] for g in run.optimizer.param_groups)
        bar.set_postfix_str(f'loss {state.loss_sum / state.samples:.4f}  lr {lr:.3g}  '
                            f'{state.samples * env.world_size / max(state.seconds, 1e-9):.0f} img/s', refresh=False)


# -- the end of an epoch -------------------------------------------------------------------------------------
def evaluate_epoch(run: Run, epoch: int, should_stop, desc: str) -> Tuple[Dict[str, Any], List[Optional[str]]]:
    """The epoch's metrics row (training sums over every rank, validation of the model and its EMA)."""
    state, env = run.state, run.env
    sums = all_reduce(torch.tensor([state.loss_sum, float(state.samples), float(state.failed_count)],
                                   dtype=torch.float64, device=env.device), env)
    notes = [check_failures(int(sums[2].item()), len(run.data.train_ds), state.failed, 'training')]

    def validate(model, what):
        return evaluate(model, run.data.val_loader, env.device, env=env, autocast=run.autocast,
                        progress=run.cfg.progress, desc=f'{desc} {what}', should_stop=should_stop)

    val = validate(run.model, 'val')
    ema_val = validate(run.ema.module, 'val (EMA)') if val is not None and run.ema is not None else None
    if val is None or (run.ema is not None and ema_val is None):
        save(run)
        raise Interrupted(should_stop() or signal.SIGTERM, run.out / 'last.pth', epoch, state.batches_done)
    notes.append(check_failures(val['failed_count'], len(run.data.val_ds), val['failed'], 'validation'))
    ema = ema_val or {}
    return {
        'epoch': epoch + 1, 'lr': max(g['lr'] for g in run.optimizer.param_groups),
        'train_loss': sums[0].item() / max(sums[1].item(), 1), 'val_loss': val['loss'], 'top1': val['top1'],
        'top5': val['top5'], 'img_per_s': sums[1].item() / max(state.seconds, 1e-9),
        'time': state.seconds + val['seconds'] + ema.get('seconds', 0.0), 'ema_val_loss': ema.get('loss'),
        'ema_top1': ema.get('top1'), 'ema_top5': ema.get('top5'),
    }, notes


def end_epoch(run: Run, records: Records, row: Dict[str, Any], notes: List[Optional[str]]) -> None:
    """Best metric, metrics.csv, the checkpoints (unless inside a run of non-finite losses), the epoch's line."""
    state = run.state
    # the epoch's metric is that of the better of the model and its EMA (the EMA on a tie, as the reference
    # evaluates it): an EMA still near its start on a short run must not make the run look worse than its model.
    # The checkpoints record which one it was, and t2tvit.load_checkpoint serves those weights by default.
    kept = 'ema' if row['ema_top1'] is not None and row['ema_top1'] >= row['top1'] else 'model'
    metric = row['ema_top1'] if kept == 'ema' else row['top1']
    row['kept'] = kept
    is_best = state.best_metric is None or metric > state.best_metric
    if is_best:
        state.best_metric, state.best_epoch = metric, row['epoch']
        state.best_kept = kept if run.ema is not None else None
    state.epoch = row['epoch']
    state.start_epoch()
    records.add(row)
    if state.nonfinite_in_row:  # keep the last good checkpoint rather than this state
        run.say(f'note: epoch {state.epoch} ended on {state.nonfinite_in_row} non-finite step(s) in a row; '
                'last.pth not updated')
    else:
        save(run, is_best, kept if run.ema is not None else None)
    for note in notes:
        if note:
            run.say(note)
    ema_part = f'  ema top1 {row["ema_top1"]:.2f}' if row['ema_top1'] is not None else ''
    skipped = f'  ({state.nonfinite_total} non-finite steps skipped)' if state.nonfinite_total else ''
    run.say(
        f'epoch {state.epoch}/{run.plan.epochs}  train loss {row["train_loss"]:.4f}  val loss {row["val_loss"]:.4f}  '
        f'top1 {row["top1"]:.2f}  top5 {row["top5"]:.2f}{ema_part}  lr {row["lr"]:.3g}  '
        f'{row["img_per_s"]:.0f} img/s  {row["time"]:.1f}s{"  *best*" if is_best else ""}'
        f'{f" ({kept})" if is_best and run.ema is not None else ""}{skipped}')


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

