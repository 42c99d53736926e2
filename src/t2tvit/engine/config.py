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
AMP_DTYPES = ('auto', 'bfloat16', 'float16')
ACTIVATIONS = ('lean', 'plain')
_UNSET = object()


@dataclass(frozen=True)
class Flag:
    """How a field is spelled on the command line (``t2tvit train`` / ``finetune``; cli.py reads it)."""

    names: Tuple[str, ...] = ()  # option strings; () means --field-name
    metavar: Optional[str] = None
    group: str = 'run'  # the help section
    switch: str = ''  # booleans: 'on' (--x), 'off' (--no-x only), 'both' (--x and --no-x)
    commands: Tuple[str, ...] = ('train', 'finetune')  # where it is a run flag (others may declare it too)

    def option_strings(self, name: str) -> Tuple[str, ...]:
        return self.names or ('--' + name.replace('_', '-'),)


def setting(default: Any, help: str, *, finetune: Any = _UNSET, choices: Optional[Tuple[str, ...]] = None,
            flag: Optional[Flag] = None):
    """A RunConfig field: its default for ``train`` (and ``finetune`` when different), help, choices, CLI flag."""
    metadata = {'help': help, 'choices': choices, 'flag': flag}
    if finetune is not _UNSET:
        metadata['finetune'] = finetune
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


def _flag(*names: str, **kw) -> Flag:
    return Flag(names=names, **kw)


OPT, AUG, KD, MEM = 'optimization', 'augmentation and regularization', 'knowledge distillation', 'memory'

# ``finetune=`` values are the reference transfer recipe (transfer_learning.py with the README's flags): CIFAR
# at 224, plain (not Nesterov) SGD momentum 0.9 (timm's 'momentum'; its 'sgd' is Nesterov), lr 0.05 at batch
# 64, wd 5e-4 on every trained tensor, cosine to 2e-4 over 60 epochs, the T2T module and the blocks at 1% of
# the head's lr, cls_token and the final norm not trained, fp32. The others are the paper's ImageNet recipe
# (the reference main.py and README).


@dataclass
class RunConfig:
    # -- what is trained on what
    model: str = setting('', 'registered model name, e.g. t2t_vit_14 (`t2tvit models`); with a t2tvit checkpoint, '
                         'the one it names by default', flag=_flag('--model', metavar='NAME'))
    model_kwargs: Dict[str, Any] = setting({}, 'extra model constructor arguments, e.g. depth=4')
    data: Optional[str] = setting(None, 'DATA root; None: the built-in digits')
    dataset: Optional[str] = setting(None, 'folder (default with DATA), cifar10/cifar100 python archives in DATA, '
                                     'digits (default without DATA)', choices=DATASETS, flag=_flag())
    img_size: Optional[int] = setting(None, "square input size (default: the model's; the position table is "
                                      'resized)', finetune=224, flag=_flag(metavar='PX'))
    checkpoint: Optional[str] = setting(None, 'initial weights (finetune: the pretrained model)')
    val_split: float = setting(0.0, 'validate on this stratified share of the training images, drawn by --seed and '
                               'never trained on, instead of DATA/val (needed when DATA has no val/)',
                               flag=_flag(metavar='FRACTION'))

    # -- where it goes
    output: str = setting('runs/train', 'checkpoints, metrics.csv, curves.png, config.yaml', finetune='runs/finetune',
                          flag=_flag('-o', '--output', metavar='DIR'))
    resume: Optional[str] = setting(None, 'continue a run; auto: OUTPUT/last.pth', flag=_flag(metavar='PATH|auto'))
    overwrite: bool = setting(False, 'replace the run already in OUTPUT', flag=_flag(switch='on'))
    stop_after_epochs: Optional[int] = setting(
        None, 'end after K epochs as an interruption would (the schedule still follows --epochs)',
        flag=_flag(metavar='K'))

    # -- schedule (timm's, stepped per epoch as in the reference). ``epochs`` is every epoch the run trains,
    # warm-up and cool-down included: the reference's 300 cosine epochs + 10 cool-down epochs at min_lr are
    # 310. Short runs shrink the warm-up and cool-down (engine/builders.py: epoch_plan).
    epochs: int = setting(310, 'epochs to train, warm-up and cool-down included', finetune=60,
                          flag=_flag(metavar='E', group=OPT))
    sched: str = setting('cosine', 'timm scheduler (cosine, step, ...)', flag=_flag(group=OPT))
    warmup_epochs: int = setting(10, 'linear warm-up from --warmup-lr, at most a fifth of --epochs', finetune=0,
                                 flag=_flag(group=OPT))
    warmup_lr: float = setting(1e-6, 'lr at the start of the warm-up', flag=_flag(group=OPT))
    min_lr: float = setting(1e-5, 'lr at the end of the schedule', finetune=2e-4, flag=_flag(group=OPT))
    cooldown_epochs: int = setting(10, 'epochs at --min-lr at the end, at most a tenth of --epochs', finetune=0,
                                   flag=_flag(group=OPT))
    sched_on_updates: bool = setting(False, 'the schedule (warm-up included) moves every step, not every epoch')

    # -- optimizer
    opt: str = setting('adamw', 'any timm optimizer (adamw, sgd, momentum, ...)', finetune='momentum',
                       flag=_flag(group=OPT))
    lr: float = setting(5e-4, 'peak lr for a global batch of --lr-base-size (scaled linearly)', finetune=0.05,
                        flag=_flag(group=OPT))
    lr_base_size: int = setting(512, 'the global batch --lr is quoted for; 0: use --lr as given', finetune=64,
                                flag=_flag(metavar='N', group=OPT))
    weight_decay: float = setting(0.05, 'weight decay', finetune=5e-4, flag=_flag(group=OPT))
    momentum: float = setting(0.9, 'SGD momentum', flag=_flag(group=OPT))
    clip_grad: Optional[float] = setting(None, 'clip the gradient norm', flag=_flag(metavar='NORM', group=OPT))
    transfer_ratio: Optional[float] = setting(None, 'backbone lr = lr x ratio, the new head at lr', finetune=0.01,
                                              flag=_flag(group=OPT, commands=('finetune',)))
    # the reference transfer_learning.py leaves cls_token and the final norm out of the optimizer
    transfer_all: bool = setting(False, 'also train cls_token and the final norm (at the backbone lr); the '
                                 'reference recipe keeps them as loaded',
                                 flag=_flag(group=OPT, switch='on', commands=('finetune',)))
    batch_size: int = setting(64, 'per process', flag=_flag('-b', '--batch-size', metavar='B', group=OPT))

    # -- augmentation and regularization
    augment: str = setting('timm', 'timm: random-resized crop, RandAugment, erasing; pad-crop: padded crop and '
                           'flip (the transfer recipe); none', finetune='pad-crop', choices=AUGMENTS,
                           flag=_flag(group=AUG))
    auto_augment: Optional[str] = setting('rand-m9-mstd0.5-inc1', 'RandAugment policy; none: off', finetune=None,
                                          flag=_flag('--aa', metavar='POLICY', group=AUG))
    scale: Tuple[float, float] = setting((0.08, 1.0), 'random-resized crop: area range')
    ratio: Tuple[float, float] = setting((3 / 4, 4 / 3), 'random-resized crop: aspect ratio range')
    hflip: float = setting(0.5, 'horizontal flip probability', flag=_flag(group=AUG))
    color_jitter: float = setting(0.4, 'colour jitter strength (when RandAugment is off)')
    train_interpolation: str = setting('random', "interpolation of the training crops ('random': bilinear or "
                                       'bicubic)')
    reprob: float = setting(0.25, 'random erasing probability', finetune=0.0, flag=_flag(group=AUG))
    remode: str = setting('pixel', 'random erasing fill')
    mixup: float = setting(0.8, 'mixup alpha (0: off)', finetune=0.0, flag=_flag(group=AUG))
    cutmix: float = setting(1.0, 'cutmix alpha (0: off)', finetune=0.0, flag=_flag(group=AUG))
    mixup_prob: float = setting(1.0, 'probability of mixing a batch')
    mixup_switch_prob: float = setting(0.5, 'probability of cutmix instead of mixup when both are on')
    mixup_mode: str = setting('batch', "timm Mixup's mode: batch, pair or elem")
    smoothing: float = setting(0.1, 'label smoothing', finetune=0.0, flag=_flag(group=AUG))
    drop_rate: float = setting(0.0, 'dropout rate', flag=_flag('--drop', group=AUG))
    drop_path: float = setting(0.1, 'stochastic depth rate', flag=_flag(group=AUG))

    # -- memory
    grad_checkpointing: bool = setting(False, 'keep only the input of each T2T layer and block and rerun it in '
                                       'backward: the least memory for about 20% more time, the same weights',
                                       flag=_flag(group=MEM, switch='on'))
    activations: str = setting('lean', 'lean: keep the inputs of LayerNorm and GELU for backward and recompute their '
                               'outputs (layers/lean.py), the same weights in less memory; plain: keep the outputs '
                               '(a few % faster on small models, whose memory is no concern)', choices=ACTIVATIONS,
                               flag=_flag(group=MEM))

    # -- evaluation preprocessing; None: the model's pretrained_cfg (CIFAR's statistics on CIFAR)
    mean: Optional[Tuple[float, float, float]] = setting(None, 'normalisation mean')
    std: Optional[Tuple[float, float, float]] = setting(None, 'normalisation std')
    crop_pct: Optional[float] = setting(None, "center-crop fraction (default: the model's)", finetune=1.0,
                                        flag=_flag(metavar='PCT', commands=()))
    interpolation: Optional[str] = setting(None, "resize interpolation (default: the model's)", finetune='bilinear')

    # -- model EMA (reference: on, 0.99996)
    model_ema: bool = setting(True, 'keep an EMA of the weights', finetune=False, flag=_flag(group=AUG, switch='both'))
    model_ema_decay: float = setting(0.99996, 'EMA decay per step', flag=_flag(group=AUG))
    model_ema_warmup: bool = setting(False, "timm ModelEmaV3's decay warm-up")
    # 0.99996 averages over ~25,000 steps: 3% of the reference's 775,000 (310 epochs of ImageNet at batch 512),
    # but more than a short run has in all, whose EMA then stays at its random start. The cap leaves the
    # reference untouched (a tenth of its run is 77,500 steps) and shortens the average on a short run only.
    model_ema_horizon: float = setting(0.1, "the EMA's horizon, 1 / (1 - decay) steps, is at most this fraction of "
                                       "the run's steps (the decay is lowered to fit); 0: the decay as given",
                                       flag=_flag(metavar='FRACTION', group=AUG))

    # -- knowledge distillation (teacher in eval mode, no distillation token)
    teacher: Optional[str] = setting(None, 'any timm or t2tvit model', flag=_flag(metavar='MODEL', group=KD))
    teacher_checkpoint: Optional[str] = setting(None, "the teacher's weights (never downloaded)",
                                                flag=_flag(metavar='PATH', group=KD))
    distill: Optional[str] = setting(None, 'hard: the teacher\'s argmax as the target; soft: KL to its softened '
                                     'distribution', choices=DISTILL_MODES, flag=_flag(group=KD))
    distill_alpha: float = setting(0.5, 'weight of the teacher term', flag=_flag(group=KD))
    distill_tau: float = setting(1.0, 'soft distillation temperature', flag=_flag(group=KD))

    # -- machine
    seed: int = setting(42, 'seed of every random stream', flag=_flag())
    workers: int = setting(4, 'data loader processes per rank', flag=_flag('-j', '--workers'))
    device: Optional[str] = setting(None, 'cuda, cuda:1, cpu (default: cuda if available)', flag=_flag())
    cache_images: bool = setting(False, 'decode the images once and keep them in memory as uint8 (small images: '
                                 'CIFAR-10\'s 50,000 at 32px are 150 MB), cropped and flipped in batches; needs '
                                 '--augment pad-crop or none', flag=_flag(switch='both'))
    compile: bool = setting(False, 'torch.compile the training model (about half a minute of compiling at the '
                            'start; the EMA and checkpoints stay eager)', flag=_flag(switch='both'))
    amp: Optional[bool] = setting(None, 'autocast (bf16 where supported, else fp16); --no-amp: fp32; unset: '
                                  'autocast where it is faster than fp32 (CUDA, CPUs with AMX)', finetune=False,
                                  flag=_flag(switch='both'))
    amp_dtype: str = setting('auto', 'autocast dtype (auto: bf16 where supported, else fp16)', choices=AMP_DTYPES)
    progress: bool = setting(True, 'no progress bars (the per-epoch lines stay)',
                             flag=_flag(switch='off'))

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
FINETUNE_DEFAULTS: Dict[str, Any] = {name: f.metadata['finetune'] for name, f in FIELDS.items()
                                     if 'finetune' in f.metadata}


def defaults(command: str) -> RunConfig:
    """The defaults of ``command`` ('train' or 'finetune') before any preset or flag."""
    cfg = RunConfig()
    return apply(cfg, FINETUNE_DEFAULTS, 'finetune defaults') if command == 'finetune' else cfg


def _base_type(tp) -> type:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return _base_type([a for a in typing.get_args(tp) if a is not type(None)][0])
    return origin or tp


def field_type(name: str) -> type:
    """The plain type of field ``name`` (int for Optional[int]): what its flag parses."""
    return _base_type(FIELDS[name].type)


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
    cfg = defaults(command)
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
    for name, f in FIELDS.items():
        value, choices = getattr(cfg, name), f.metadata.get('choices')
        need(value is None or not choices or value in choices,
             f'{_spelling(name)} {value}: expected one of {", ".join(choices or ())}')
    dataset = cfg.dataset or ('folder' if cfg.data else 'digits')
    need(dataset == 'digits' or bool(cfg.data), f'--dataset {dataset} needs DATA (the folder that holds it)')
    need(cfg.epochs >= 1, f'--epochs {cfg.epochs}: must be at least 1')
    need(cfg.batch_size >= 1, f'--batch-size {cfg.batch_size}: must be at least 1')
    need(cfg.lr > 0, f'--lr {cfg.lr}: must be positive')
    need(cfg.warmup_epochs >= 0, f'--warmup-epochs {cfg.warmup_epochs}: must be 0 or more')
    need(cfg.cooldown_epochs >= 0, f'--cooldown-epochs {cfg.cooldown_epochs}: must be 0 or more')
    need(0.0 <= cfg.model_ema_horizon <= 1.0,
         f'--model-ema-horizon {cfg.model_ema_horizon}: must be within [0, 1] (0: --model-ema-decay as given)')
    need(0.0 <= cfg.model_ema_decay < 1.0, f'--model-ema-decay {cfg.model_ema_decay}: must be within [0, 1)')
    need(0.0 <= cfg.val_split < 1.0, f'--val-split {cfg.val_split}: must be a fraction in [0, 1), e.g. 0.1')
    need(cfg.workers >= 0, f'--workers {cfg.workers}: must be 0 or more')
    need(
        cfg.stop_after_epochs is None or cfg.stop_after_epochs >= 1,
        f'--stop-after-epochs {cfg.stop_after_epochs}: must be at least 1',
    )
    need(cfg.img_size is None or cfg.img_size >= 1, f'--img-size {cfg.img_size}: must be positive')
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
        isinstance(cfg.grad_checkpointing, bool),
        f'grad_checkpointing {cfg.grad_checkpointing!r}: true or false',
    )
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    need(
        not mixing or cfg.batch_size % 2 == 0,
        f'--batch-size {cfg.batch_size}: mixup/cutmix need an even batch size (or --mixup 0 --cutmix 0)',
    )
    return dataclasses.replace(cfg, dataset=dataset)


def _spelling(name: str) -> str:
    """How a user wrote field ``name``: its flag when it has one, else its YAML key."""
    flag = FIELDS[name].metadata.get('flag')
    return flag.option_strings(name)[-1] if flag else name


def diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore: List[str]) -> List[str]:
    """Keys whose values differ between two config dicts (for the resume note)."""
    return sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))
