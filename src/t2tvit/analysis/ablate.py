"""``t2tvit ablate``: the paper's ablations retrained at small scale, with one recipe, over seeds.

The paper's claims (ImageNet, 224x224, 300 epochs):

- Table 7, the T2T module: T2T-ViT-14 (81.5) beats the same backbone on plain patches
  (T2T-ViT-14 without T2T, 79.5) and the T2T module made of convolutions (T2T-ViT-c-14, 80.8);
  a Transformer layer instead of the Performer in the T2T module is about as good (T2T-ViT-t-14,
  81.7) at more MACs.
- Table 7, the backbone: deep-narrow (T2T-ViT-14, 384 wide, 14 deep) beats shallow-wide
  (T2T-ViT-d768-4, 768 wide, 4 deep, 78.8) at similar parameters, as Table 6 found for ViT
  (ViT-DN 79.0 against ViT-SW 69.9).

Here each of those models is shrunk the same way, so that only what the ablation changes
differs: a total token stride of 4 (T2T soft splits with kernels 3, 3, 3 and strides 1, 2, 2,
or 4x4 patches), a 64-wide, 8-deep backbone (or 128 wide and 2 deep, at about the same
parameters, for shallow-wide), token width 32. Every model trains with one recipe
(:data:`RECIPE`) for the same epochs on the same data, for several seeds; the final epoch's
validation top-1 is compared (no selection of the best epoch on the validation set).

An effect counts as *reproduced* when the mean difference has the paper's sign and is larger
than twice its standard error over seeds; *same direction* when the sign agrees but the
difference is within that noise; *reversed* / *opposite, within noise* otherwise. "About as
good" counts as reproduced when the difference is at most 1 point and twice its standard error
at most 2 points (a noisier comparison cannot tell).
"""
import csv
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

# -- the ablation set -----------------------------------------------------------------------------
BACKBONES: dict[str, dict[str, Any]] = {
    'deep-narrow': {'embed_dim': 64, 'depth': 8, 'num_heads': 2, 'mlp_ratio': 2.0},
    'shallow-wide': {'embed_dim': 128, 'depth': 2, 'num_heads': 4, 'mlp_ratio': 2.0},
}
T2T_SMALL = {'t2t_kernel_sizes': (3, 3, 3), 't2t_strides': (1, 2, 2), 't2t_paddings': (1, 1, 1), 'token_dim': 32}
PATCH_SMALL = {'patch_size': 4}

# key -> the registered model it shrinks, how its tokens are made, its backbone
VARIANTS: dict[str, dict[str, str]] = {
    't2t': {'label': 'T2T-ViT (Performer T2T)', 'model': 't2t_vit_14', 'stem': 't2t', 'backbone': 'deep-narrow'},
    'wo_t2t': {'label': 'without T2T (4x4 patches)', 'model': 't2t_vit_14_wo_t2t', 'stem': 'patch',
                   'backbone': 'deep-narrow'},
    'conv_t2t': {'label': 'convolutional T2T (T2T-ViT-c)', 'model': 't2t_vit_c_14', 'stem': 't2t',
                     'backbone': 'deep-narrow'},
    'transformer_t2t': {'label': 'Transformer T2T (T2T-ViT-t)', 'model': 't2t_vit_t_14', 'stem': 't2t',
                            'backbone': 'deep-narrow'},
    'shallow_wide': {'label': 'shallow-wide backbone', 'model': 't2t_vit_14_wide', 'stem': 't2t',
                         'backbone': 'shallow-wide'},
}


@dataclass(frozen=True)
class Effect:
    """The paper's claim that ``a`` beats ``b`` (``expect='better'``) or matches it (``'similar'``)."""
    name: str
    table: str
    a: str
    b: str
    claim: str
    expect: str = 'better'

    def paper_difference(self) -> float | None:
        from .profile import paper_results
        ra, rb = paper_results(VARIANTS[self.a]['model'], 224), paper_results(VARIANTS[self.b]['model'], 224)
        if not ra or not rb or ra[0] is None or rb[0] is None:
            return None
        return round(ra[0] - rb[0], 2)


EFFECTS = (
    Effect('T2T module vs plain patches', 'Table 7', 't2t', 'wo_t2t', 'the T2T module beats plain patches'),
    Effect('T2T by attention vs by convolutions', 'Table 7', 't2t', 'conv_t2t',
           'a T2T module of attention beats one of convolutions'),
    Effect('deep-narrow vs shallow-wide backbone', 'Table 7', 't2t', 'shallow_wide',
           'deep-narrow beats shallow-wide at similar params'),
    Effect('Performer vs Transformer in the T2T module', 'Table 7', 't2t', 'transformer_t2t',
           'the Performer about as good as a Transformer, at fewer MACs', 'similar'),
)
SIMILAR_TOLERANCE = 1.0  # top-1 points

# one recipe for every model: AdamW + cosine as the paper, no mixup/EMA at this scale, small shifts
# (the schedule steps per epoch, so a warm-up epoch would be an epoch at warmup_lr: none at this length)
RECIPE: dict[str, Any] = {
    'opt': 'adamw', 'lr': 1e-3, 'lr_base_size': 0, 'weight_decay': 0.05, 'batch_size': 64, 'sched': 'cosine',
    'warmup_epochs': 0, 'min_lr': 1e-5, 'cooldown_epochs': 0, 'augment': 'pad-crop', 'hflip': 0.0,
    'auto_augment': None, 'mixup': 0.0, 'cutmix': 0.0, 'smoothing': 0.1, 'reprob': 0.0, 'drop_rate': 0.0,
    'drop_path': 0.0, 'model_ema': False, 'workers': 0, 'progress': False,
    'overwrite': True, 'sched_on_updates': True,
}
DEFAULT_SEEDS = 3


def model_kwargs(key: str, img_size: int) -> dict[str, Any]:
    """Constructor arguments of the small-scale version of ``VARIANTS[key]`` at ``img_size``."""
    v = VARIANTS[key]
    stem = T2T_SMALL if v['stem'] == 't2t' else PATCH_SMALL
    return {'img_size': img_size, **stem, **BACKBONES[v['backbone']]}


def dataset_img_size(dataset: str) -> int:
    """Digits are 8x8: 16x16 keeps every pixel at a quarter of 32x32's cost; other data at 32."""
    return 16 if dataset == 'digits' else 32


def detect_dataset(data: str | None) -> str:
    """digits without DATA; cifar10/cifar100 when DATA holds (or is) the python archive folder; else folder
    (an image folder, shards or datasets files)."""
    from ..sources import kind_of

    if data is None:
        return 'digits'
    if kind_of(data) is not None:  # shards (a folder, a manifest, a URL, pipe:) or datasets files
        return 'folder'
    root = Path(data)
    if not root.is_dir():
        raise UserError(f'{data}: no such folder (give an image folder with train/ and val/, a CIFAR folder, '
                        f'or nothing for the built-in digits)')
    for dataset, folder in (('cifar10', 'cifar-10-batches-py'), ('cifar100', 'cifar-100-python')):
        if (root / folder).is_dir() or root.name == folder:
            return dataset
    return 'folder'


# -- results --------------------------------------------------------------------------------------
@dataclass
class Run:
    variant: str
    model: str
    seed: int
    epochs: int
    img_size: int
    params: int
    macs: int
    top1: float
    best_top1: float
    seconds: float


@dataclass
class Verdict:
    effect: Effect
    paper: float | None
    diff: float
    se: float | None
    verdict: str

    def describe(self) -> str:
        spread = f' ± {self.se:.1f}' if self.se is not None else ''
        paper = f'paper {self.paper:+.1f}' if self.paper is not None else 'paper: no number'
        return (f'{self.effect.name} ({self.effect.table}): {self.diff:+.1f}{spread} points here, '
                f'{paper}: {self.verdict}')


@dataclass
class Ablation:
    runs: list[Run]
    verdicts: list[Verdict]
    dataset: str
    img_size: int
    epochs: int
    seeds: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    machine: str = ''
    files: list[Path] = field(default_factory=list)


def _scores(runs: Sequence[Run], key: str) -> list[float]:
    return [r.top1 for r in runs if r.variant == key]


def judge(effect: Effect, a: Sequence[float], b: Sequence[float]) -> Verdict:
    """Compare the final top-1 of ``a`` and ``b`` over seeds (see the module docstring for the rule)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = None
    if len(a) > 1 and len(b) > 1:
        se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    paper = effect.paper_difference()
    noise = 2 * se if se is not None else None
    if effect.expect == 'similar':
        if abs(diff) <= SIMILAR_TOLERANCE and (noise is None or noise <= 2 * SIMILAR_TOLERANCE):
            verdict = 'reproduced (about as good)'
        elif noise is not None and abs(diff) <= noise:
            verdict = 'too noisy to tell (the difference is within seed noise)'
        else:
            verdict = f'not reproduced (differ by more than {max(SIMILAR_TOLERANCE, noise or 0):.1f} points)'
    elif noise is None:
        verdict = 'same direction (one seed: no spread to test against)' if diff > 0 else \
            'opposite direction (one seed: no spread to test against)'
    elif diff > noise:
        verdict = 'reproduced'
    elif diff > 0:
        verdict = 'same direction, within seed noise'
    elif diff < -noise:
        verdict = 'reversed'
    else:
        verdict = 'opposite direction, within seed noise'
    return Verdict(effect, paper, diff, se, verdict)


# -- planning and training ------------------------------------------------------------------------
def _counts(key: str, img_size: int, num_classes: int, in_chans: int = 3) -> tuple[int, int]:
    from ..factory import create_model
    from .profile import count_macs, count_params
    with torch.device('meta'):
        model = create_model(VARIANTS[key]['model'], num_classes=num_classes, **model_kwargs(key, img_size))
    return count_params(model), count_macs(model.eval(), (img_size, img_size), in_chans)


def _step_seconds(key: str, img_size: int, num_classes: int, batch: int, threads: int) -> float:
    """Seconds of one training step at ``batch`` on ``threads`` threads (best of two after a warm-up)."""
    from ..engine.builders import autocast_pays
    from ..factory import create_model
    model = create_model(VARIANTS[key]['model'], num_classes=num_classes, **model_kwargs(key, img_size))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # the runs leave --amp unset: bf16 where autocast pays (a CPU with AMX), so the estimate times that
    bf16 = autocast_pays(torch.device('cpu'))
    x = torch.randn(batch, 3, img_size, img_size)
    y = torch.randint(0, num_classes, (batch,))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return min(times[1:])


def _square(images) -> bool:
    """Whether the first readable image is square (then every image of a CIFAR-like set is)."""
    for i in range(min(len(images), 8)):
        try:
            w, h = images.image(i).size
        except (OSError, ValueError, UserError):
            continue
        return w == h
    return False


RUN_OVERHEAD_S = 4.0  # a run's start: data, model, first checkpoint (measured on 2 CPU cores: 3-5 s)
WORKER_START_S = 5.0  # a worker process importing torch and timm


def estimated_seconds(epochs: int, epoch_seconds: Sequence[float], seeds: int, jobs: int = 1,
                      run_overhead: float = RUN_OVERHEAD_S) -> float:
    """Wall time of all runs: ``epoch_seconds`` holds one epoch of each model; ``jobs`` runs go on at once."""
    runs = seeds * len(epoch_seconds)
    start = WORKER_START_S if jobs > 1 else 0.0
    return (seeds * epochs * sum(epoch_seconds) + runs * run_overhead) / jobs + start


def plan_epochs(epochs: int, budget_minutes: float | None, epoch_seconds: Sequence[float], seeds: int,
                jobs: int = 1, run_overhead: float = RUN_OVERHEAD_S) -> tuple[int, str]:
    """Epochs for every run so that all fit the budget (at most ``epochs``, at least 1), and a note."""
    if not budget_minutes:
        return epochs, ''
    fixed = estimated_seconds(0, epoch_seconds, seeds, jobs, run_overhead)
    per_epoch = estimated_seconds(1, epoch_seconds, seeds, jobs, run_overhead) - fixed
    fit = int((budget_minutes * 60 - fixed) // max(per_epoch, 1e-9))
    if fit >= epochs:
        return epochs, ''
    if fit < 1:
        return 1, (f'the budget of {budget_minutes:g} min is below one epoch of every run '
                   f'(~{(per_epoch + fixed) / 60:.1f} min): 1 epoch each')
    return fit, f'the budget of {budget_minutes:g} min fits {fit} of the {epochs} epochs asked for'


def default_jobs() -> int:
    """Runs trained at once: up to 2 on a CPU (models this small gain more from a process per core than
    from threads), 1 on a GPU."""
    import os
    if torch.cuda.is_available():
        return 1
    return max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1))


def _init_worker(threads: int, parent: int) -> None:
    torch.set_num_threads(threads)
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when the ablate process ends (killed, or Ctrl-C'd while the
    pool waits), instead of leaving it training on alone; a parent already gone by now ends it at once."""
    import ctypes
    import os
    import sys
    if not sys.platform.startswith('linux'):
        return
    try:
        # PR_SET_PDEATHSIG with SIGKILL, not SIGTERM: the training loop takes SIGTERM as 'save and stop after
        # this step', and the run's result has no one left to report to; its atomic last.pth stays as it was
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request: no signal will come
        os._exit(1)


def _train_one(key: str, seed: int, overrides: dict[str, Any], counts: tuple[int, int]) -> Run:
    """One training run through the engine (in this process or a worker)."""
    from ..engine import train
    from ..engine.config import build_config
    cfg = build_config('train', overrides=overrides)
    start = time.perf_counter()
    result = train(cfg, log=lambda *_: None)
    return Run(key, cfg.model, seed, cfg.epochs, int(cfg.img_size), counts[0], counts[1],
               float(result.last_metrics['top1']), float(result.best_metric), time.perf_counter() - start)


def run_ablation(
        data: str | None = None,
        epochs: int = 30,
        budget_minutes: float | None = 10.0,
        seeds: int = DEFAULT_SEEDS,
        img_size: int | None = None,
        out_dir='runs/ablate',
        variants: Sequence[str] | None = None,
        jobs: int | None = None,
        val_split: float = 0.0,
        log: Callable[[str], None] = print,
) -> Ablation:
    """Train every variant for ``seeds`` seeds, then write ablation.csv, ablation.png and summary.md."""
    from .. import data as D

    if epochs < 1:
        raise UserError(f'--epochs {epochs}: must be at least 1')
    if seeds < 1:
        raise UserError(f'--seeds {seeds}: must be at least 1')
    if budget_minutes is not None and budget_minutes <= 0:
        raise UserError(f'--budget-minutes {budget_minutes:g}: must be positive')
    jobs = jobs or default_jobs()
    if jobs < 1:
        raise UserError(f'--jobs {jobs}: must be at least 1')
    keys = list(variants or VARIANTS)
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        raise UserError(f'unknown ablation variant {unknown[0]!r} (choose from {", ".join(VARIANTS)})')
    dataset = detect_dataset(data)
    img_size = img_size or dataset_img_size(dataset)
    if img_size % 4:
        raise UserError(f'--img-size {img_size}: must be a multiple of 4 (the token stride of the ablation models)')
    out = Path(out_dir)
    start = time.perf_counter()

    if not 0 <= val_split < 1:
        raise UserError(f'--val-split {val_split:g}: must be at least 0 and below 1 (e.g. 0.1)')
    train_images, _ = D.training_images(dataset, data, img_size, val_split=val_split, seed=0)
    num_classes, n_train = len(train_images.classes), len(train_images)
    batch = min(RECIPE['batch_size'], n_train)
    steps = max(1, n_train // batch)
    counts = {k: _counts(k, img_size, num_classes) for k in keys}
    # an epoch is its steps plus a validation pass and a checkpoint: about 1.3x the steps alone;
    # ``jobs`` runs share the machine, each on its share of the cores
    threads = max(1, torch.get_num_threads() // jobs)
    epoch_s = [1.3 * steps * _step_seconds(k, img_size, num_classes, batch, threads) for k in keys]
    planned, note = plan_epochs(epochs, budget_minutes, epoch_s, seeds, jobs)
    notes = [note] if note else []
    where = f'{dataset}' + (f' ({data})' if data else '')
    minutes = estimated_seconds(planned, epoch_s, seeds, jobs) / 60
    log(f'ablation on {where} at {img_size}x{img_size}: {len(keys)} models x {seeds} seeds x {planned} epochs, '
        f'{jobs} at a time, about {minutes:.1f} min' + (f'; {notes[0]}' if notes else ''))

    # images of one size (CIFAR, the digits, a folder of square images) are decoded once and kept in memory
    recipe = {**RECIPE, 'batch_size': batch, 'data': data, 'dataset': dataset, 'img_size': img_size,
              'epochs': planned, 'val_split': val_split, 'cache_images': _square(train_images)}
    todo = [(k, seed, {**recipe, 'model': VARIANTS[k]['model'], 'model_kwargs': model_kwargs(k, img_size),
                       'seed': seed, 'output': str(out / 'runs' / f'{k}-seed{seed}')})
            for seed in range(seeds) for k in keys]
    runs: list[Run] = []

    def done(run: Run) -> None:
        runs.append(run)
        log(f'[{len(runs)}/{len(todo)}] {VARIANTS[run.variant]["label"]}, seed {run.seed}: '
            f'top-1 {run.top1:.1f}% ({run.seconds:.0f} s)')

    if jobs == 1:
        for k, seed, overrides in todo:
            done(_train_one(k, seed, overrides, counts[k]))
    else:
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor, as_completed
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context('spawn'), initializer=_init_worker,
                                 initargs=(threads, os.getpid())) as pool:
            futures = [pool.submit(_train_one, k, seed, overrides, counts[k]) for k, seed, overrides in todo]
            for f in as_completed(futures):
                done(f.result())
    order = {(k, seed): i for i, (k, seed, _) in enumerate(todo)}
    runs.sort(key=lambda r: order[(r.variant, r.seed)])

    verdicts = [judge(e, _scores(runs, e.a), _scores(runs, e.b)) for e in EFFECTS
                if e.a in keys and e.b in keys]
    result = Ablation(runs, verdicts, dataset, img_size, planned, seeds, time.perf_counter() - start, notes,
                      machine=_machine(jobs))
    result.files = write_outputs(result, out)
    return result


# -- outputs --------------------------------------------------------------------------------------
CSV_FIELDS = [f.name for f in dataclasses.fields(Run)]


def write_csv(runs: Sequence[Run], path: Path) -> Path:
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=['label'] + CSV_FIELDS)
        w.writeheader()
        for r in runs:
            w.writerow({'label': VARIANTS[r.variant]['label'], **dataclasses.asdict(r)})
    return path


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary(result: Ablation) -> str:
    """One paragraph: the setting, each effect against the paper, and the spread over seeds."""
    keys = list(dict.fromkeys(r.variant for r in result.runs))
    spread = '; '.join(
        f'{VARIANTS[k]["label"]} {m:.1f} ± {s:.1f}' for k in keys for m, s in [_mean_std(_scores(result.runs, k))])
    effects = ' '.join(f'{v.describe()}.' for v in result.verdicts)
    seeds = f'{result.seeds} seeds' if result.seeds > 1 else '1 seed (too few to measure a spread; use 3 or more)'
    notes = f' Note: {"; ".join(result.notes)}.' if result.notes else ''
    return (f'At small scale ({result.dataset}, {result.img_size}x{result.img_size}, {result.epochs} epochs of '
            f'one recipe, {seeds}, {result.seconds / 60:.1f} min on {result.machine}), the differences of final '
            f'validation top-1 (mean ± standard error over seeds) against the paper\'s ImageNet numbers: '
            f'{effects} Top-1 per model (mean ± standard deviation over seeds, %): {spread}. An effect is '
            f'reproduced when it has the paper\'s sign and exceeds twice its standard error; at this scale a '
            f'tiny dataset and a short schedule can hide or reverse effects the paper measured on ImageNet.'
            f'{notes}')


def _machine(jobs: int) -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if jobs > 1:
        return f'CPU, {jobs} runs at a time x {max(1, torch.get_num_threads() // jobs)} thread(s)'
    return f'CPU, {torch.get_num_threads()} thread(s)'


def write_outputs(result: Ablation, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    text = summary(result)
    (out / 'summary.md').write_text(f'# Ablation at small scale\n\n{text}\n')
    return [write_csv(result.runs, out / 'ablation.csv'), render_ablation(result, out / 'ablation.png'),
            out / 'summary.md']


def render_ablation(result: Ablation, path: Path) -> Path:
    """Top-1 against MACs per model (seeds as dots, mean ± std), the paper's effects as arrows, verdicts."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13.0, 6.0), dpi=100, layout='constrained')
    seeds = f'{result.seeds} seeds' if result.seeds > 1 else '1 seed'
    fig.suptitle(f'Ablations of T2T-ViT at small scale: {result.dataset} {result.img_size}x{result.img_size}, '
                 f'{result.epochs} epochs, {seeds}', fontsize=12)
    ax, side = fig.subplots(1, 2, width_ratios=[1.5, 1])
    keys = list(dict.fromkeys(r.variant for r in result.runs))
    colours = dict(zip(VARIANTS, ['tab:red', 'tab:blue', 'tab:green', 'tab:orange', 'tab:purple']))
    centre = {}
    for k in keys:
        runs = [r for r in result.runs if r.variant == k]
        x = runs[0].macs / 1e6
        ys = [r.top1 for r in runs]
        mean, std = _mean_std(ys)
        centre[k] = (x, mean)
        ax.scatter([x] * len(ys), ys, s=14, color=colours[k], alpha=0.45)
        ax.errorbar([x], [mean], yerr=[std], fmt='o', markersize=8, capsize=4, color=colours[k],
                    label=f'{VARIANTS[k]["label"]}: {mean:.1f} ± {std:.1f}%')
    for i, v in enumerate(result.verdicts, 1):
        (xb, yb), (xa, ya) = centre[v.effect.b], centre[v.effect.a]
        ok = v.verdict.startswith('reproduced')
        head = '-' if v.effect.expect == 'similar' else '->'
        ax.annotate('', xy=(xa, ya), xytext=(xb, yb),
                    arrowprops={'arrowstyle': head, 'color': 'tab:green' if ok else '0.5', 'lw': 1.2,
                                'linestyle': '-' if ok else '--', 'shrinkA': 8, 'shrinkB': 8})
        ax.annotate(str(i), ((xa + xb) / 2, (ya + yb) / 2), fontsize=9, ha='center', va='center',
                    bbox={'boxstyle': 'circle,pad=0.2', 'fc': 'white', 'ec': '0.5'})
    ax.set_xlabel('MACs per image (M), counted at the ablation size', fontsize=10)
    ax.set_ylabel('final validation top-1 (%)', fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, loc='best')
    ax.set_title('numbered lines: the effects listed on the right; arrows point from the model the paper\n'
                 'finds worse to the better one (green: reproduced here, grey dashed: not)', fontsize=9)

    side.set_axis_off()
    side.set_title("the paper's effects (ImageNet, 224) and here", fontsize=10)
    lines = []
    for i, v in enumerate(result.verdicts, 1):
        paper = f' ({v.paper:+.1f} pt)' if v.paper is not None else ''
        spread = f' ± {v.se:.1f}' if v.se is not None else ''
        lines.append(f'{i}. {v.effect.name} ({v.effect.table})\n'
                     f'   paper: {v.effect.claim}{paper}\n'
                     f'   here: {v.diff:+.1f}{spread} pt: {v.verdict}')
    lines.append('here: first model minus second, in top-1 points, ± the standard error\n'
                 'over seeds; legend: mean ± standard deviation over seeds')
    if result.notes:
        lines.append('note: ' + '; '.join(result.notes))
    side.text(0.0, 1.0, '\n\n'.join(lines), va='top', ha='left', fontsize=9, wrap=True,
              transform=side.transAxes)
    fig.savefig(path, dpi=100)
    return path
