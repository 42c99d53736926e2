"""Epochs of ``--config cifar10_scratch`` on real CIFAR-10 JPEGs: the fast path against the per-image path.

"before": the preset with ``--no-amp --no-cache-images --no-compile`` (fp32, a loader process decoding and
transforming each JPEG with PIL: the code path every run took before the fast path existed, unchanged);
"after": the preset as shipped (images decoded once into memory and cropped/flipped in batches, the model
through torch.compile, bf16 autocast where the CPU has AMX). Both train 2 epochs in turn (A, B, B, A, ...),
from fresh processes on the same image slice; the speed-up is the median over rounds of the second epoch's
time ratio (training plus the validation of the model and its EMA; the first holds torch.compile's start).
Then, for where the time goes: the loader alone over one epoch, and the model's training step alone.

    python benchmarks/scratch_speed.py                    # ~15 minutes on 2 cores
    python benchmarks/scratch_speed.py --per-class 200 --rounds 1 --models t2t_vit_lite_32   # a smoke run

The images: ../shared/data/cifar10-jpeg/train.tar.gz (or --data, a folder of class folders).
"""
import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'src'))
TAR = ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg' / 'train.tar.gz'
BEFORE = ['--no-amp', '--no-cache-images', '--no-compile']
FLAGS = ('avx512_bf16', 'avx512_vnni', 'amx_tile', 'amx_bf16', 'amx_int8')


def cpu_line() -> str:
    model, flags = platform.processor() or 'unknown CPU', set()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name') and model in ('', 'unknown CPU', 'x86_64'):
                model = line.split(':', 1)[1].strip()
            if line.startswith('flags'):
                flags = set(line.split(':', 1)[1].split())
                break
    except OSError:
        pass
    have = [f for f in FLAGS if f in flags]
    lack = [f for f in FLAGS if f not in flags]
    return (f'{model}, {len(os.sched_getaffinity(0))} cores; CPU flags: {" ".join(have) or "none of"}'
            + (f' (no {", ".join(lack)})' if lack else ''))


def slice_folder(source: Path, per_class: int, out: Path) -> Path:
    """The first ``per_class`` images of each class as links under ``out`` (DATA/<class>/*.jpg)."""
    for cls in sorted(p for p in source.iterdir() if p.is_dir()):
        (out / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:per_class]:
            (out / cls.name / f.name).symlink_to(f.resolve())
    return out


def one_run(data: Path, model: str, extra, out: Path) -> dict:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, '-m', 't2tvit', 'train', str(data), '--config', 'cifar10_scratch', '--model',
                        model, '--epochs', '2', '--no-progress', '--overwrite', '-o', str(out), *extra],
                       capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': str(ROOT / 'src')})
    wall = time.perf_counter() - start
    if r.returncode:
        raise SystemExit(f'{model} {extra}: exit {r.returncode}\n{r.stderr[-3000:]}')
    with open(out / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    precision = next((w for w in ('bfloat16', 'fp32', 'float16') if f'cpu {w}' in r.stdout or f'cuda {w}' in r.stdout),
                     '?')
    return {'wall': wall, 'epoch1': float(rows[0]['time']), 'epoch2': float(rows[1]['time']),
            'img_s': float(rows[1]['img_per_s']), 'top1': float(rows[1]['top1']), 'precision': precision}


def loader_seconds(data: Path, memory: bool) -> tuple[float, float]:
    """(set-up, one epoch) seconds of the preset's training batches, without a model."""
    from t2tvit import data as D
    from t2tvit.engine.config import build_config
    from t2tvit.engine.run import TRAIN_TRANSFORM_KEYS
    cfg = build_config('train', 'cifar10_scratch')
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    train, _ = D.training_images('folder', str(data), 32, val_split=cfg.val_split, seed=cfg.seed)
    start = time.perf_counter()
    if memory:
        cache = D.DecodedImages(train, D.memory_prepare('pad-crop', 32, mean, std, 0.9, 'bicubic'), 32, cfg.workers)
        sampler = D.EpochSampler(cache, seed=cfg.seed)
        loader = D.MemoryLoader(cache, cfg.batch_size, sampler, mean, std, (D.pad_crop_padding(32), cfg.hflip),
                                drop_last=True)
    else:
        settings = {k: getattr(cfg, k) for k in TRAIN_TRANSFORM_KEYS}
        settings.update(train_interpolation='bicubic', crop_pct=0.9)
        ds = D.AugmentedDataset(train, D.train_transform('pad-crop', 32, mean, std, 'bicubic', **settings),
                                seed=cfg.seed)
        sampler = D.EpochSampler(ds, seed=cfg.seed)
        loader = D.make_loader(ds, cfg.batch_size, sampler, cfg.workers, drop_last=True)
    decoded = time.perf_counter() - start
    start = time.perf_counter()
    for _ in loader:
        pass
    return decoded, time.perf_counter() - start


def step_rate(model_name: str, after: bool, steps: int = 4) -> float:
    """Images per second of the training step alone at batch 128 (fp32 eager, or the preset's after path)."""
    import timm

    import t2tvit  # noqa: F401
    from t2tvit.engine.builders import autocast_pays
    model = timm.create_model(model_name, num_classes=10)
    model.set_lean_activations(False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = torch.compile(model) if after else model
    bf16 = after and autocast_pays(torch.device('cpu'))
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return 128 / statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--data', type=Path, help='a folder of class folders (default: the shared CIFAR-10 JPEGs)')
    ap.add_argument('--models', default='t2t_vit_lite_32,t2t_vit_7_32')
    ap.add_argument('--per-class', type=int, default=1000, help='images per class for t2t_vit_lite_32')
    ap.add_argument('--per-class-7', type=int, default=250, help='images per class for t2t_vit_7_32 (5x slower)')
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('-o', '--output', type=Path, default=ROOT / 'benchmarks' / 'RESULTS_scratch.md')
    args = ap.parse_args()
    began = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix='scratch_speed_'))
    source = args.data
    if source is None:
        if not TAR.is_file():
            raise SystemExit(f'no images: {TAR} is missing; give --data DIR (a folder of class folders)')
        with tarfile.open(TAR) as tar:
            tar.extractall(tmp / 'jpegs', filter='data')
        source = tmp / 'jpegs' / 'train'
    lines = ['# cifar10_scratch: the fast path against the per-image path, per epoch\n',
             f'Machine: {cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} torch threads; '
             f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; '
             f'`python benchmarks/scratch_speed.py` ran MINUTES min.',
             'Real CIFAR-10 JPEGs (32x32), the preset `--config cifar10_scratch` (batch 128, 1 loader process, '
             '10% held out), 2 epochs per run in a fresh process, settings alternating; "before" adds '
             f'`{" ".join(BEFORE)}`. Epoch time = training + validation of the model and its EMA.\n',
             '| model | images (train / held-out) | setting | precision | epoch 2 | train img/s | 2 epochs with '
             'start-up | epoch speed-up | whole-run speed-up |',
             '|---|---|---|---|---|---|---|---|---|']
    for model in args.models.split(','):
        per_class = args.per_class if model == 't2t_vit_lite_32' else args.per_class_7
        data = slice_folder(source, per_class, tmp / f'slice{per_class}')
        results = {'before': [], 'after': []}
        for r in range(args.rounds):
            order = ('before', 'after') if r % 2 == 0 else ('after', 'before')
            for setting in order:
                got = one_run(data, model, BEFORE if setting == 'before' else [], tmp / f'run_{setting}')
                results[setting].append(got)
                print(model, setting, got, flush=True)
        ratio = statistics.median(b['epoch2'] / a['epoch2'] for b, a in zip(results['before'], results['after']))
        wall = statistics.median(b['wall'] / a['wall'] for b, a in zip(results['before'], results['after']))
        n = per_class * 10
        for setting in ('before', 'after'):
            rs = results[setting]
            lines.append(
                f'| {model} | {n - n // 10} / {n // 10} | {setting} | {rs[0]["precision"]} | '
                f'{statistics.median(x["epoch2"] for x in rs):.1f} s | '
                f'{statistics.median(x["img_s"] for x in rs):.0f} | '
                f'{statistics.median(x["wall"] for x in rs):.0f} s | '
                + (f'**{ratio:.2f}x** | {wall:.2f}x |' if setting == 'after' else ' | |'))
    lines += ['', 'Where the time goes (same machine, same run):', '',
              '| part | before | after | ratio |', '|---|---|---|---|']
    data = tmp / f'slice{args.per_class}'
    n = args.per_class * 9
    dec_b, it_b = loader_seconds(data, memory=False)
    dec_a, it_a = loader_seconds(data, memory=True)
    lines.append(f'| loader, one epoch of {n} images (decode + augment + batch) | {dec_b + it_b:.1f} s (in a '
                 f'loader process beside the model) | {dec_a:.1f} s decode once + {it_a:.2f} s batches | '
                 f'{(dec_b + it_b) / max(it_a, 1e-9):.0f}x per epoch after the first |')
    from t2tvit.engine.builders import autocast_pays
    bf16 = ', bf16' if autocast_pays(torch.device('cpu')) else ''
    for model in args.models.split(','):
        b, a = step_rate(model, False), step_rate(model, True)
        lines.append(f'| {model} training step alone, batch 128 | {b:.0f} img/s fp32 eager | {a:.0f} img/s '
                     f'compiled{bf16} | {a / b:.2f}x |')
    text = '\n'.join(lines).replace('MINUTES', f'{(time.perf_counter() - began) / 60:.0f}') + '\n'
    args.output.write_text(text)
    print(text)


if __name__ == '__main__':
    main()
