"""One run, one dataclass: all ``train`` / ``finetune`` need, filled from defaults, a YAML preset, flags.

Precedence, lowest first: the command's defaults (``train``: the paper's ImageNet recipe from the
reference ``main.py`` and README; ``finetune``: the reference ``transfer_learning.py`` recipe), then
the YAML preset given with ``--config`` (a path, ``./configs/NAME.yaml``, or a preset NAME shipped
in the package's ``configs/`` folder), then the flags given on the command line. The resolved
config is written to ``OUTPUT/config.yaml`` and into every checkpoint, and can be passed back with
``--config``.
"""

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml

from ..errors import UserError

DATASETS = ('folder', 'cifar10', 'cifar100', 'digits')
AUGMENTS = ('timm', 'pad-crop', 'none')
DISTILL_MODES = ('hard', 'soft')



@dataclass
class RunConfig:
    # -- what is trained on what
    model: str = ''
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra constructor arguments, e.g. depth
    data: Optional[str] = None  # DATA root; None means the built-in digits
    dataset: Optional[str] = None  # folder | cifar10 | cifar100 | digits; None: folder if data else digits
    img_size: Optional[int] = None  # None: the model's default
    checkpoint: Optional[str] = None  # initial weights (finetune: the pretrained model)

    # -- where it goes
    output: str = 'runs/train'
    resume: Optional[str] = None  # 'auto' (OUTPUT/last.pth) or a path
    overwrite: bool = False
    stop_after_epochs: Optional[int] = None

    # -- schedule (timm's cosine with warm-up and cool-down, stepped per epoch as in the reference).
    # ``epochs`` is every epoch the run trains, warm-up and cool-down included: the reference's 300
    # cosine epochs + 10 cool-down epochs at min_lr are 310. Short runs shrink the warm-up to at
    # most a fifth of the run and the cool-down to at most a tenth (engine/builders.py: epoch_plan).
    epochs: int = 310
    sched: str = 'cosine'
    warmup_epochs: int = 10
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: int = 10
    sched_on_updates: bool = False  # True: the schedule (warm-up included) moves every step, not every epoch

    # -- optimizer; lr is for a global batch of lr_base_size and scales linearly (0: no scaling)
    opt: str = 'adamw'
    lr: float = 5e-4
    lr_base_size: int = 512
    weight_decay: float = 0.05
    momentum: float = 0.9
    clip_grad: Optional[float] = None
    transfer_ratio: Optional[float] = None  # backbone lr = lr * transfer_ratio, head lr = lr
    # with transfer_ratio: also train cls_token and the final norm (at the backbone lr); the reference
    # transfer_learning.py leaves them out of the optimizer, so they keep their pretrained values
    transfer_all: bool = False
    batch_size: int = 64  # per process

    # -- augmentation and regularization
    augment: str = 'timm'  # timm: RandAugment pipeline; pad-crop: the transfer recipe; none
    auto_augment: Optional[str] = 'rand-m9-mstd0.5-inc1'
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.4
    train_interpolation: str = 'random'
    reprob: float = 0.25
    remode: str = 'pixel'
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = 'batch'
    smoothing: float = 0.1
    drop_rate: float = 0.0
    drop_path: float = 0.1

    # -- memory: rerun each T2T layer and block in backward, keeping only its input
    grad_checkpointing: bool = False
    # 'lean': LayerNorm/GELU outputs recomputed in backward from their kept inputs (layers/lean.py); 'plain'
    activations: str = 'lean'

    # -- evaluation preprocessing; None: the model's pretrained_cfg (CIFAR's statistics on CIFAR)
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None

    # -- model EMA (reference: on, 0.99996)
    model_ema: bool = True
    model_ema_decay: float = 0.99996
    model_ema_warmup: bool = False

    # -- knowledge distillation (teacher in eval mode, no distillation token)
    teacher: Optional[str] = None
    teacher_checkpoint: Optional[str] = None
    distill: Optional[str] = None  # hard | soft
    distill_alpha: float = 0.5
    distill_tau: float = 1.0

    # -- machine
    seed: int = 42
    workers: int = 4
    device: Optional[str] = None  # None: cuda if available, else cpu
    amp: Optional[bool] = None  # None: autocast on CUDA, fp32 on CPU
    amp_dtype: str = 'auto'  # auto (bf16 where supported, else fp16) | bfloat16 | float16
    progress: bool = True

    def to_dict(self) -> Dict[str, Any]:
        """Plain values only (lists for tuples): YAML and ``torch.load(weights_only=True)`` read it."""

        def plain(v):
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {str(k): plain(x) for k, x in v.items()}
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}

# The reference transfer recipe (transfer_learning.py with the README's flags): CIFAR at 224,
# plain (not Nesterov) SGD momentum 0.9 (timm's 'momentum'; its 'sgd' is Nesterov), lr 0.05 at
# batch 64, wd 5e-4 on every trained tensor, cosine to 2e-4 over 60 epochs, the T2T module and the
# blocks at 1% of the head's lr, cls_token and the final norm not trained, fp32.
FINETUNE_DEFAULTS: Dict[str, Any] = dict(
    output='runs/finetune',
    epochs=60,
    sched='cosine',
    warmup_epochs=0,
    cooldown_epochs=0,
    min_lr=2e-4,
    opt='momentum',
    lr=0.05,
    lr_base_size=64,
    weight_decay=5e-4,
    momentum=0.9,
    batch_size=64,
    transfer_ratio=0.01,
    img_size=224,
    crop_pct=1.0,
    interpolation='bilinear',
    augment='pad-crop',
    auto_augment=None,
    mixup=0.0,
    cutmix=0.0,
    smoothing=0.0,
    reprob=0.0,
    model_ema=False,
    amp=False,
)


def _base_type(tp) -> type:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return _base_type([a for a in typing.get_args(tp) if a is not type(None)][0])
    return origin or tp


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check one value against the field's type (YAML lists become tuples)."""
    if value is None:
        return None
    kind = _base_type(FIELDS[name].type)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: (
            isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()
        ),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        tuple: lambda v: (
            isinstance(v, (list, tuple))
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        ),
        dict: lambda v: isinstance(v, dict),
    }[kind](value)
    if not ok:
        example = RunConfig().to_dict()[name]
        raise UserError(
            f'{source}: {name}: {value!r} is not a valid value (expected a {kind.__name__}'
            f'{f", like {example!r}" if example is not None else ""})'
        )
    return tuple(float(x) for x in value) if kind is tuple else kind(value)


def apply(cfg: RunConfig, values: Mapping[str, Any], source: str) -> RunConfig:
    """``cfg`` with ``values`` set; an unknown key is a UserError naming the closest field."""
    updates = {}
    for key, value in values.items():
        name = str(key).replace('-', '_')
        if name not in FIELDS:
            close = difflib.get_close_matches(name, list(FIELDS), n=1, cutoff=0.6)
            hint = f'; did you mean {close[0]!r}?' if close else ''
            raise UserError(f'{source}: unknown key {key!r}{hint}')
        updates[name] = _coerce(name, value, source)
    return dataclasses.replace(cfg, **updates)


def shipped_presets() -> Dict[str, Any]:
    """The presets shipped inside the package (``t2tvit/configs/NAME.yaml``), by name.

    Read through :mod:`importlib.resources`, so they are found in an editable install, a wheel
    installed anywhere, or a zipped package alike.
    """
    folder = resources.files('t2tvit').joinpath('configs')
    if not folder.is_dir():
        return {}
    return {
        x.name[: -len('.yaml')]: x for x in sorted(folder.iterdir(), key=lambda x: x.name) if x.name.endswith('.yaml')
    }


def find_preset(name_or_path: str):
    """A preset file: a path as given, else a bare NAME as ./configs/NAME.yaml, else the shipped preset NAME.

    Returns a :class:`pathlib.Path` or an :mod:`importlib.resources` traversable (both have
    ``read_text`` and print as their location).
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.suffix not in ('.yaml', '.yml') and len(p.parts) == 1:
        local = Path.cwd() / 'configs' / f'{name_or_path}.yaml'
        if local.is_file():
            return local
        shipped = shipped_presets()
        if name_or_path in shipped:
            return shipped[name_or_path]
    names = list(shipped_presets())
    hint = f' (presets: {", ".join(names)})' if names else ''
    raise UserError(f'config {name_or_path}: no such file{hint}')


def read_preset(name_or_path: str) -> Dict[str, Any]:
    path = find_preset(name_or_path)
    try:
        values = yaml.safe_load(path.read_text(encoding='utf-8')) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' line {mark.line + 1}' if mark is not None else ''
        raise UserError(f'config {path}:{where}: not valid YAML ({getattr(e, "problem", e)})') from None
    if not isinstance(values, dict):
        raise UserError(f'config {path}: expected a mapping of config keys, got {type(values).__name__}')
    return values


def build_config(
    command: str, preset: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None
) -> RunConfig:
    """The run config of ``command`` ('train' or 'finetune'): defaults < preset < overrides."""
    cfg = RunConfig()
    if command == 'finetune':
        cfg = apply(cfg, FINETUNE_DEFAULTS, 'finetune defaults')
    if preset:
        cfg = apply(cfg, read_preset(preset), f'config {find_preset(preset)}')
    if overrides:
        cfg = apply(cfg, overrides, 'command line')
    return check(cfg)


def check(cfg: RunConfig) -> RunConfig:
    """Value checks a user can get wrong; the messages name the flag."""

    def need(ok: bool, msg: str):
        if not ok:
            raise UserError(msg)

    need(bool(cfg.model), 'no model: give --model NAME or a --config preset that names one')
    dataset = cfg.dataset or ('folder' if cfg.data else 'digits')
    need(dataset in DATASETS, f'--dataset {cfg.dataset}: expected one of {", ".join(DATASETS)}')
    need(dataset == 'digits' or bool(cfg.data), f'--dataset {dataset} needs DATA (the folder that holds it)')
    need(cfg.augment in AUGMENTS, f'augment {cfg.augment!r}: expected one of {", ".join(AUGMENTS)}')
    need(cfg.epochs >= 1, f'--epochs {cfg.epochs}: must be at least 1')
    need(cfg.batch_size >= 1, f'--batch-size {cfg.batch_size}: must be at least 1')
    need(cfg.lr > 0, f'--lr {cfg.lr}: must be positive')
    need(cfg.warmup_epochs >= 0, f'--warmup-epochs {cfg.warmup_epochs}: must be 0 or more')
    need(cfg.cooldown_epochs >= 0, f'--cooldown-epochs {cfg.cooldown_epochs}: must be 0 or more')
    need(cfg.workers >= 0, f'--workers {cfg.workers}: must be 0 or more')
    need(
        cfg.stop_after_epochs is None or cfg.stop_after_epochs >= 1,
        f'--stop-after-epochs {cfg.stop_after_epochs}: must be at least 1',
    )
    need(cfg.img_size is None or cfg.img_size >= 1, f'--img-size {cfg.img_size}: must be positive')
    need(cfg.distill in (None,) + DISTILL_MODES, f'--distill {cfg.distill}: expected hard or soft')
    need(
        not cfg.distill or bool(cfg.teacher),
        '--distill needs --teacher MODEL (and --teacher-checkpoint PATH)',
    )
    need(not cfg.teacher or bool(cfg.distill), '--teacher needs --distill hard|soft')
    need(
        not cfg.teacher or bool(cfg.teacher_checkpoint),
        '--teacher needs --teacher-checkpoint PATH (weights are never downloaded)',
    )
    need(0.0 <= cfg.distill_alpha <= 1.0, f'--distill-alpha {cfg.distill_alpha}: must be within [0, 1]')
    need(cfg.distill_tau > 0, f'--distill-tau {cfg.distill_tau}: must be positive')
    need(
        cfg.amp_dtype in ('auto', 'bfloat16', 'float16'),
        f'amp_dtype {cfg.amp_dtype!r}: auto, bfloat16 or float16',
    )
    need(
        isinstance(cfg.grad_checkpointing, bool),
        f'grad_checkpointing {cfg.grad_checkpointing!r}: true or false',
    )
    need(cfg.activations in ('lean', 'plain'), f'activations {cfg.activations!r}: lean or plain')
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    need(
        not mixing or cfg.batch_size % 2 == 0,
        f'--batch-size {cfg.batch_size}: mixup/cutmix need an even batch size (or --mixup 0 --cutmix 0)',
    )
    return dataclasses.replace(cfg, dataset=dataset)


def diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore: List[str]) -> List[str]:
    """Keys whose values differ between two config dicts (for the resume note)."""
    return sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))
