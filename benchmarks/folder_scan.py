"""Start-up of a 2-rank torchrun job on a folder of 50,000 JPEGs: every rank scanning it (before) against
rank 0 scanning it and broadcasting the list (after).

    python benchmarks/folder_scan.py [--data DIR] [--rounds 3]

Each round runs both settings in fresh torchrun jobs (gloo, 2 processes on this machine) and times, on every
rank, ``training_images`` (the tree walk, the class lists, the held-out split) from process-group start;
the job's start-up is the slower rank's. Prints a markdown table; the default data is the shared CIFAR-10
JPEGs (../shared/data/cifar10-jpeg/train.tar.gz, unpacked into a temporary folder).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAR = ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg' / 'train.tar.gz'

WORKER = """
import json, os, sys, time
from t2tvit import data
from t2tvit.engine.distributed import init_distributed, shutdown, barrier
env = init_distributed('cpu')
if sys.argv[2] == 'before':
    data.scan_folder = data._scan_folder  # every rank walks the tree itself, as before
barrier(env)
start = time.perf_counter()
train, val = data.training_images('folder', sys.argv[1], 32, val_split=0.1, seed=42)
seconds = time.perf_counter() - start
print(json.dumps({'rank': env.rank, 'seconds': seconds, 'images': len(train) + len(val)}), flush=True)
shutdown(env)
"""


def job(data: Path, setting: str, port: int) -> float:
    script = Path(tempfile.mkdtemp()) / 'scan.py'
    script.write_text(WORKER)
    env = {**os.environ, 'PYTHONPATH': str(ROOT / 'src'), 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                        str(port), str(script), str(data), setting], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')]
    return max(row['seconds'] for row in rows), rows[0]['images']


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--data', type=Path)
    ap.add_argument('--rounds', type=int, default=3)
    args = ap.parse_args()
    data = args.data
    if data is None:
        tmp = Path(tempfile.mkdtemp(prefix='folder_scan_'))
        with tarfile.open(TAR) as tar:
            tar.extractall(tmp, filter='data')
        data = tmp / 'train'
    times = {'before': [], 'after': []}
    images = 0
    for r in range(args.rounds):
        for setting in (('before', 'after') if r % 2 == 0 else ('after', 'before')):
            seconds, images = job(data, setting, 29600 + 2 * r + (setting == 'after'))
            times[setting].append(seconds)
    cpu = next((line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                if line.startswith('model name')), platform.processor())
    b, a = statistics.median(times['before']), statistics.median(times['after'])
    print(f'{cpu}, {len(os.sched_getaffinity(0))} cores; {images} images; 2 ranks (gloo); median of {args.rounds}')
    print('| setting | folder set-up, slower rank |\n|---|---|')
    print(f'| every rank scans (before) | {b:.2f} s |\n| rank 0 scans, broadcasts (after) | {a:.2f} s |')
    print(f'ratio {b / a:.2f}x; files listed: 2 x {images} before, 1 x {images} after')


if __name__ == '__main__':
    main()
