"""The pieces a run is made of, built from its config with timm's factories.

Model, weights, teacher, optimizer, schedule, losses, mixed precision: each turns the mistakes a
user can make (a wrong name, a checkpoint of another model, an image size the T2T geometry
cannot tile) into a :class:`~t2tvit.errors.UserError`.
"""

import contextlib
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpoint, read_checkpoint
from ..data import resolve_preprocessing
from ..errors import UserError
from ..factory import UnknownModelError, create_model, list_models, model_from_checkpoint


# -- models and weights --------------------------------------------------------------------------------
@contextlib.contextmanager
def _model_errors(name: Optional[str], img_size: Optional[int]):
    """Bad names, sizes and keyword arguments of a model to build become one-line errors."""
    try:
        yield
    except UserError:
        raise
    except UnknownModelError as e:
        raise UserError(str(e)) from None
    except (ValueError, AssertionError) as e:
        what = f'--img-size {img_size}' if img_size is not None else f'model {name}'
        raise UserError(f'{what}: {e}') from None
    except TypeError as e:
        raise UserError(f'model {name}: {e} (check model_kwargs)') from None


def build_model(name: str, **kwargs) -> nn.Module:
    """A registered t2tvit model; bad names, sizes and keyword arguments become one-line errors."""
    with _model_errors(name, kwargs.get('img_size')):
        return create_model(name, **kwargs)


def train_config(ckpt: Checkpoint) -> Dict[str, Any]:
    """The run config saved in one of our training checkpoints ({} for other layouts)."""
    return dict(ckpt.run_config)


def model_for_checkpoint(
    name: Optional[str], path: str, img_size: Optional[int] = None
) -> Tuple[nn.Module, Checkpoint, str]:
    """A model carrying the checkpoint's weights (EMA when present), built as the checkpoint says."""
    ckpt = read_checkpoint(path)
    with _model_errors(name, img_size):
        model = model_from_checkpoint(ckpt, name, img_size=img_size)
    return model, ckpt, name or model.t2tvit_config['model']


def finetune_model(
    name: str,
    ckpt: Checkpoint,
    model_kwargs: Dict[str, Any],
    regularisation: Dict[str, Any],
    load: bool = True,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """``name`` built with the pretrained checkpoint's architecture arguments, overridden by ``model_kwargs``
    (the run's img_size, num_classes, ...), its weights loaded unless ``load=False``: the new head stays as
    initialised (the point of fine-tuning, so no warning), the position table is resized. Returns the model
    and its constructor arguments for the run to record (``regularisation``, the drop rates, left out)."""
    with _model_errors(name, model_kwargs.get('img_size')):
        model = model_from_checkpoint(ckpt, name, load=load, new_head=True, **regularisation, **model_kwargs)
    recorded = model.t2tvit_config['model_kwargs']
    return model, {k: v for k, v in recorded.items() if k not in regularisation}


def build_teacher(name: str, checkpoint: str, num_classes: int, device: torch.device) -> nn.Module:
    """Any timm or t2tvit model in eval mode, weights from ``checkpoint`` (never downloaded)."""
    import timm

    if not Path(checkpoint).is_file():
        raise UserError(f'--teacher-checkpoint {checkpoint}: no such file')
    if name in list_models():
        with _model_errors(name, None):
            teacher = model_from_checkpoint(read_checkpoint(checkpoint), name)
    else:
        known = timm.list_models()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f'; did you mean {", ".join(close)}?' if close else ''
            raise UserError(f'--teacher {name}: unknown model{hint}')
        teacher = timm.create_model(name, pretrained=False, num_classes=num_classes)
        try:
            from timm.models import load_checkpoint as timm_load

            timm_load(teacher, checkpoint, use_ema=True, strict=True)
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(
                f'--teacher-checkpoint {checkpoint} does not fit {name}: '
                f'{str(e).strip().splitlines()[0][:200]}'
            ) from None
    if getattr(teacher, 'num_classes', num_classes) != num_classes:
        raise UserError(
            f'--teacher {name} predicts {teacher.num_classes} classes, the data has {num_classes}'
        )
    teacher.eval().requires_grad_(False)
    return teacher.to(device)


# -- preprocessing -------------------------------------------------------------------------------------
def data_settings(model: nn.Module, cfg) -> Dict[str, Any]:
    """img_size, mean, std, crop_pct, interpolation: the config's where given, else the model's
    (CIFAR's mean/std for CIFAR data)."""
    overrides = {k: getattr(cfg, k) for k in ('mean', 'std', 'crop_pct', 'interpolation')}
    pre = resolve_preprocessing(model, overrides, dataset=cfg.dataset)
    return {k: pre[k] for k in ('img_size', *overrides)}  # the run's fields; in_chans is the model's


# -- optimization ----------------------------------------------------------------------------------------
def scaled_lr(lr: float, global_batch: int, base_size: int) -> float:
    """The linear scaling rule of the reference recipe: lr is quoted for a global batch of ``base_size``."""
    return lr * global_batch / base_size if base_size else lr


def describe_lr(cfg, global_batch: int) -> str:
    """The peak lr and where it comes from, for the run's start line."""
    lr = scaled_lr(cfg.lr, global_batch, cfg.lr_base_size)
    if cfg.lr_base_size:
        text = (
            f'peak lr {lr:.3g} = {cfg.lr:g} x {global_batch} / {cfg.lr_base_size} '
            f'(linear scaling, --lr-base-size {cfg.lr_base_size})'
        )
    else:
        text = f'peak lr {lr:.3g} (--lr as given, --lr-base-size 0)'
    if cfg.transfer_ratio is not None:
        text += f', backbone at lr x {cfg.transfer_ratio:g} = {lr * cfg.transfer_ratio:.3g} (--transfer-ratio)'
    return text


# the reference transfer_learning.py optimizes the T2T module, the blocks and the head; these stay as loaded
TRANSFER_LEFT_OUT = ('cls_token', 'norm.')


def transfer_groups(model: nn.Module, lr: float, ratio: float, train_all: bool = False):
    """Parameter groups of the reference transfer recipe: the new head at ``lr``, the backbone at ``lr * ratio``.

    ``cls_token`` and the final ``norm`` are left out of the optimizer as transfer_learning.py does
    (their ``requires_grad`` is switched off, so they neither move nor count in gradient clipping),
    unless ``train_all``: then they join the backbone. The fixed position table is never trained.
    """
    head, backbone = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith('head.'):
            head.append(p)
        elif not train_all and (name == TRANSFER_LEFT_OUT[0] or name.startswith(TRANSFER_LEFT_OUT[1])):
            p.requires_grad_(False)
        else:
            backbone.append(p)
    return [{'params': backbone, 'lr': lr * ratio}, {'params': head, 'lr': lr}]


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    try:
        if cfg.transfer_ratio is None:
            return create_optimizer_v2(
                model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
            )
        # given as groups, timm applies the weight decay to every tensor, as torch.optim.SGD did in the reference
        groups = transfer_groups(model, lr, cfg.transfer_ratio, cfg.transfer_all)
        return create_optimizer_v2(
            groups, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
        )
    except (AssertionError, ValueError) as e:
        raise UserError(f'--opt {cfg.opt}: {e}') from None


@dataclass(frozen=True)
class EpochPlan:
    """How the ``epochs`` asked for are spent: warm-up, the decay, cool-down at min_lr (all inside ``epochs``)."""

    epochs: int
    warmup: int
    cooldown: int
    notes: Tuple[str, ...] = ()

    @property
    def decay(self) -> int:
        """The schedule's own length (timm's ``num_epochs``); the warm-up overlays its start."""
        return self.epochs - self.cooldown


def epoch_plan(cfg) -> EpochPlan:
    """Warm-up at most a fifth of the run, cool-down at most a tenth: a short run is not all warm-up.

    The reference (310 epochs, 10 warm-up, 10 cool-down) is left as it is.
    """
    warmup = min(cfg.warmup_epochs, cfg.epochs // 5)
    cooldown = min(cfg.cooldown_epochs, cfg.epochs // 10)
    notes = []
    if warmup < cfg.warmup_epochs:
        notes.append(f'--warmup-epochs {cfg.warmup_epochs} capped at a fifth of the run')
    if cooldown < cfg.cooldown_epochs:
        notes.append(f'--cooldown-epochs {cfg.cooldown_epochs} capped at a tenth of the run')
    return EpochPlan(cfg.epochs, warmup, cooldown, tuple(notes))


def ema_decay(decay: float, horizon: float, total_steps: int) -> float:
    """The EMA decay a run uses: ``decay``, lowered so that its horizon ``1 / (1 - decay)`` is at most
    ``horizon`` of the run's ``total_steps`` (``horizon`` 0: ``decay`` as given)."""
    if horizon <= 0 or total_steps <= 0:
        return decay
    return min(decay, 1.0 - 1.0 / max(horizon * total_steps, 1.0))


def describe_schedule(cfg, plan: EpochPlan) -> str:
    """``E epochs (W warm-up from .., cosine to .., C cool-down at min lr; notes)`` for the start line."""
    parts = [f'{plan.warmup} warm-up' + (f' from {cfg.warmup_lr:g}' if plan.warmup else '')]
    parts.append(f'{cfg.sched} to {cfg.min_lr:g}' + (' per step' if cfg.sched_on_updates else ''))
    parts.append(f'{plan.cooldown} cool-down' + (' at min lr' if plan.cooldown else ''))
    return f'{plan.epochs} epochs ({", ".join(parts + list(plan.notes))})'


def build_scheduler(optimizer, cfg, updates_per_epoch: int, plan: Optional[EpochPlan] = None):
    """timm's scheduler, per epoch as in the reference (or per step), fitted inside ``cfg.epochs``."""
    from timm.scheduler import create_scheduler_v2

    plan = plan or epoch_plan(cfg)
    try:
        # timm appends cooldown_epochs after num_epochs: ask for the decay alone so the sum is cfg.epochs
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=cfg.sched,
            num_epochs=plan.decay,
            warmup_epochs=plan.warmup,
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
            cooldown_epochs=plan.cooldown,
            step_on_epochs=not cfg.sched_on_updates,
            updates_per_epoch=updates_per_epoch,
        )
    except (AssertionError, ValueError) as e:
        raise UserError(f'--sched {cfg.sched}: {e}') from None
    return scheduler


def build_mixup(cfg, num_classes: int):
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode,
        label_smoothing=cfg.smoothing,
        num_classes=num_classes,
    )


def build_train_loss(cfg, mixup) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup is not None:
        return SoftTargetCrossEntropy()  # mixup's targets already carry the label smoothing
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


class DistillationLoss(nn.Module):
    """(1 - alpha) * the base loss + alpha * the teacher term; the student has one head (no distill token).

    soft: tau^2 * KL(teacher || student) on tau-softened distributions (Hinton et al.);
    hard: cross-entropy against the teacher's argmax (DeiT's hard distillation).
    """

    def __init__(
        self,
        base: nn.Module,
        teacher: nn.Module,
        mode: str,
        alpha: float,
        tau: float,
        teacher_size: Optional[Tuple[int, int]] = None,
    ):
        super().__init__()
        self.base = base
        self.teacher = teacher
        self.mode = mode
        self.alpha = alpha
        self.tau = tau
        self.teacher_size = teacher_size

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        base = self.base(outputs, targets)
        with torch.no_grad():
            x = inputs
            if self.teacher_size is not None and tuple(x.shape[-2:]) != tuple(self.teacher_size):
                x = F.interpolate(x, size=self.teacher_size, mode='bicubic', align_corners=False)
            teacher_out = self.teacher(x)
        if self.mode == 'soft':
            t = self.tau
            kd = F.kl_div(
                F.log_softmax(outputs.float() / t, dim=1),
                F.log_softmax(teacher_out.float() / t, dim=1),
                reduction='batchmean',
                log_target=True,
            ) * (t * t)
        else:
            kd = F.cross_entropy(outputs, teacher_out.argmax(dim=1))
        return (1 - self.alpha) * base + self.alpha * kd


def teacher_input_size(teacher: nn.Module) -> Optional[Tuple[int, int]]:
    if getattr(teacher, 'dynamic_img_size', False):
        return None
    size = getattr(teacher, 'img_size', None)
    if size is None:
        pre = getattr(teacher, 'pretrained_cfg', None) or {}
        if pre.get('fixed_input_size'):
            size = pre.get('input_size', (3, 224, 224))[1:]
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else tuple(int(s) for s in size)


# -- mixed precision ---------------------------------------------------------------------------------------
def autocast_pays(device: torch.device) -> bool:
    """Whether bf16/fp16 autocast beats fp32 on ``device``: CUDA, or a CPU with AMX tiles.

    Measured on 2 cores at batch 128: a T2T-ViT-7_32 training step is 2x faster compiled under bf16 autocast
    than fp32 eager on a Xeon with AMX (benchmarks/RESULTS_scratch.md), while a t2t_vit_lite_32 step was ~10x
    slower in bf16 on an EPYC (Zen 4) whose bf16 is vector instructions only (avx512_bf16), where the casts
    around every matmul cost more than they save.
    """
    if device.type == 'cuda':
        return True
    return device.type == 'cpu' and bool(torch.cpu._is_amx_tile_supported())


def autocast_setup(
    device: torch.device, amp: Optional[bool], amp_dtype: str
) -> Tuple[Callable[[], Any], Optional[torch.dtype], Optional[Any]]:
    """(autocast context factory, dtype or None for fp32, GradScaler for fp16 on CUDA or None).

    ``amp=None`` means autocast on CUDA and fp32 elsewhere; bfloat16 where the device supports it.
    (Training resolves its unset ``--amp`` with :func:`autocast_pays` first.)
    """
    enabled = (device.type == 'cuda') if amp is None else amp
    if not enabled:
        return contextlib.nullcontext, None, None
    if amp_dtype == 'auto':
        if device.type == 'cuda':
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.bfloat16
    else:
        dtype = getattr(torch, amp_dtype)
    if device.type not in ('cuda', 'cpu', 'xpu', 'mps'):
        return contextlib.nullcontext, None, None
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 and device.type == 'cuda' else None
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), dtype, scaler
