"""Loader throughput for the paper's ImageNet train transform on ImageNet-size photos: an image folder against
WebDataset shards, float batches normalised in the workers against uint8 batches normalised after the loader.

    python benchmarks/loader_throughput.py [--images 2000] [--size 500x375] [--rounds 2] [--workers 1 2]

The photos are the shared CIFAR-10 training JPEGs (../shared/data/cifar10-jpeg/train.tar.gz), the first
``--images`` of them upscaled (bicubic) to ``--size`` and saved as JPEG quality 90 (ImageNet's typical
size; the content is CIFAR's, blurry, so JPEG decoding is somewhat cheaper than for real ImageNet photos).
``t2tvit prepare`` writes the shards. The transform is the run default: random-resized crop to 224 with
random interpolation, flip, RandAugment rand-m9-mstd0.5-inc1, then ToTensor + Normalize + random erasing
(p 0.25) in the workers (float), or staged as training now does (``t2tvit.data.StagedTransform``, uint8:
PILToTensor in the workers, the erasing's draws made there too, the normalisation and erasing on the batch
after the loader, as timm's prefetcher does on the GPU; here on the CPU, timed with the rest; bit-equal).
Prints a markdown table: images per second of the whole loader and per worker, best of ``--rounds``.
"""
import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'src'))
from scratch_speed import TAR, cpu_line  # noqa: E402  (this folder is on sys.path when run)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photos(out: Path, count: int, size) -> Path:
    """``count`` CIFAR JPEGs (the first of each class in turn) upscaled to ``size``, as out/<class>/*.jpg."""
    from PIL import Image

    per_class = {}
    with tarfile.open(TAR) as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith('.jpg'):
                continue
            cls = Path(member.name).parent.name
            if len(per_class.setdefault(cls, [])) < count // 10:
                per_class[cls].append((member.name, tar.extractfile(member).read()))
            if sum(map(len, per_class.values())) >= count:
                break
    import io
    for cls, items in per_class.items():
        (out / cls).mkdir(parents=True, exist_ok=True)
        for name, data in items:
            img = Image.open(io.BytesIO(data)).convert('RGB').resize(size, Image.BICUBIC)
            img.save(out / cls / Path(name).name, quality=90)
    return out


def transforms(kind: str):
    """The run's train transform: whole in the workers (float), or staged (uint8; what training now uses)."""
    from t2tvit import data as D

    full = D.train_transform('timm', 224, MEAN, STD, 'bicubic', scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                             color_jitter=0.4, auto_augment='rand-m9-mstd0.5-inc1', train_interpolation='random',
                             reprob=0.25, remode='pixel', crop_pct=0.9)
    return full if kind == 'float' else D.StagedTransform.split(full)


def measure(images, kind: str, workers: int, batch: int) -> float:
    from t2tvit import data as D

    ds = D.AugmentedDataset(images, transforms(kind), seed=0)
    sampler = D.EpochSampler(ds, seed=0, groups=D.shard_groups(images))
    loader = D.make_loader(ds, batch, sampler, workers, drop_last=True)
    start, n = time.perf_counter(), 0
    for x, _, _ in loader:
        x = x.to('cpu')  # a StagedBatch is normalised and erased here, as train_step does on its device
        n += len(x)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--images', type=int, default=2000)
    ap.add_argument('--size', default='500x375')
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--workers', type=int, nargs='+', default=[1, 2])
    ap.add_argument('-b', '--batch-size', type=int, default=64)
    args = ap.parse_args()
    if not TAR.is_file():
        raise SystemExit(f'{TAR}: the shared CIFAR-10 JPEGs are not there')
    import torch

    from t2tvit import data as D
    from t2tvit import sources

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix='loader_'))
    try:
        w, h = map(int, args.size.split('x'))
        folder = photos(tmp / 'photos', args.images, (w, h))
        shards = tmp / 'shards'
        start = time.perf_counter()
        sources.prepare('folder', str(folder), str(shards), shard_images=250)
        prepare_s = time.perf_counter() - start
        mb = sum(f.stat().st_size for f in (shards / 'train').iterdir()) / 2**20
        sources_ = {'folder': D.FolderImages(folder), 'shards': sources.Manifest(str(shards)).images('train')}
        rows = []
        for workers in args.workers:
            for kind in ('float', 'uint8'):
                for name, images in sources_.items():
                    best = max(measure(images, kind, workers, args.batch_size) for _ in range(args.rounds))
                    rows.append((name, kind, workers, best))
                    print(f'{name} {kind} workers {workers}: {best:.1f} img/s', file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f'{args.images} CIFAR-10 JPEGs upscaled to {args.size} (JPEG q90), {mb:.0f} MB in 250-image shards '
          f'(prepare {prepare_s:.1f} s); {cpu_line()}; batch {args.batch_size}, '
          f'best of {args.rounds}; torch {torch.__version__}; git {_git()}\n')
    print('| data | batches | workers | img/s | img/s per worker | vs folder float |')
    print('|---|---|---|---|---|---|')
    base = {wk: v for name, kind, wk, v in rows if name == 'folder' and kind == 'float'}
    for name, kind, workers, v in rows:
        print(f'| {name} | {kind} | {workers} | {v:.1f} | {v / workers:.1f} | {v / base[workers]:.2f}x |')


def _git() -> str:
    r = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or 'unknown'


if __name__ == '__main__':
    main()
