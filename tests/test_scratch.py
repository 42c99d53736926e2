"""From scratch on real images: the EMA's horizon, the held-out split, the cifar10_scratch preset, and a
short run on CIFAR-10 JPEGs from ../shared (skipped with the reason when it is absent)."""

import collections
import csv
import json
import math
import re
import tarfile

import pytest
import torch

from conftest import ROOT
from train_helpers import load, run_cli

from t2tvit import data as D
from t2tvit.checkpoint.layouts import read_checkpoint
from t2tvit.engine import builders
from t2tvit.engine.config import build_config, find_preset
from t2tvit.errors import UserError

CIFAR_JPEGS = ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg' / 'train.tar.gz'


# -- the EMA's horizon ----------------------------------------------------------------------------------
def test_the_reference_ema_decay_is_untouched_on_the_reference_run():
    # 310 epochs of ImageNet at batch 512: 775,000 steps, a tenth of it is far beyond 0.99996's 25,000
    assert builders.ema_decay(0.99996, 0.1, 310 * 2502) == 0.99996


def test_a_short_run_gets_an_ema_horizon_of_a_tenth_of_its_steps():
    decay = builders.ema_decay(0.99996, 0.1, 156)
    assert 1 / (1 - decay) == pytest.approx(15.6)
    assert builders.ema_decay(0.99996, 0.0, 156) == 0.99996  # 0: the decay as given
    assert builders.ema_decay(0.9, 0.1, 10) == 0.0  # a one-step horizon: the EMA follows the model


@pytest.mark.parametrize('flag, value', [('--model-ema-horizon', '1.5'), ('--model-ema-decay', '1'),
                                         ('--val-split', '1')])
def test_out_of_range_ema_and_split_settings_are_one_line_errors(tmp_path, flag, value):
    r = run_cli(['train', '--model', 't2t_vit_lite_32', '--epochs', '1', flag, value], tmp_path)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert flag in r.stderr


# -- the held-out split ---------------------------------------------------------------------------------
class _Listed(D.LabelledImages):
    def __init__(self, counts):
        self.classes = [f'c{i}' for i in range(len(counts))]
        self.targets = [c for c, n in enumerate(counts) for _ in range(n)]


def test_val_split_is_stratified_disjoint_and_fixed_by_the_seed():
    images = _Listed([100, 40, 7])
    train, held = D.held_out_split(images, 0.1, seed=3)
    assert collections.Counter(held.targets) == {0: 10, 1: 4, 2: 1}
    assert sorted(train.indices + held.indices) == list(range(len(images)))
    again = D.held_out_split(images, 0.1, seed=3)[1]
    other = D.held_out_split(images, 0.1, seed=4)[1]
    assert again.indices == held.indices
    assert other.indices != held.indices and collections.Counter(other.targets) == collections.Counter(held.targets)


def test_val_split_keeps_an_image_of_every_class_for_training():
    train, held = D.held_out_split(_Listed([2, 3]), 0.9, seed=0)
    assert collections.Counter(train.targets) == {0: 1, 1: 1}
    with pytest.raises(UserError, match='at least 2 per class'):
        D.held_out_split(_Listed([5, 1]), 0.1)


def _jpeg_slice(root, per_class):
    """The first ``per_class`` JPEGs of each CIFAR-10 class, as DATA/<class>/*.jpg (no val/)."""
    if not CIFAR_JPEGS.is_file():
        pytest.skip(f'CIFAR-10 JPEGs not found at {CIFAR_JPEGS} (they sit beside the checkout in ../shared)')
    taken = collections.Counter()
    with tarfile.open(CIFAR_JPEGS) as tar:
        for member in tar:
            parts = member.name.split('/')
            if not member.isfile() or len(parts) < 3 or taken[parts[-2]] >= per_class:
                continue
            out = root / parts[-2] / parts[-1]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())
            taken[parts[-2]] += 1
            if len(taken) == 10 and min(taken.values()) >= per_class:
                break
    return root


def test_a_folder_without_val_names_the_val_split_fix(tmp_path):
    data = _jpeg_slice(tmp_path / 'c10', 4)
    with pytest.raises(UserError, match=r'--val-split 0\.1'):
        D.training_images('folder', str(data), 32)
    train, held = D.training_images('folder', str(data), 32, val_split=0.25, seed=1)
    assert len(held) == 10 and len(train) == 30 and set(held.targets) == set(range(10))
    assert held.describe == f'0.25 of {data} held out (seed 1)'
    assert held.image(0).size == (32, 32)


# -- the preset -----------------------------------------------------------------------------------------
def test_cifar10_scratch_resolves_to_what_its_comments_state():
    text = find_preset('cifar10_scratch').read_text()
    cfg = build_config('train', 'cifar10_scratch')
    assert cfg.model == 't2t_vit_lite_32' and cfg.img_size == 32 and cfg.val_split == 0.1
    assert (cfg.epochs, cfg.warmup_epochs, cfg.cooldown_epochs, cfg.sched_on_updates) == (40, 2, 0, True)
    assert (cfg.batch_size, cfg.lr, cfg.lr_base_size, cfg.opt, cfg.weight_decay) == (128, 1e-3, 0, 'adamw', 0.05)
    assert (cfg.augment, cfg.hflip, cfg.mixup, cfg.cutmix, cfg.smoothing, cfg.drop_path) == (
        'pad-crop', 0.5, 0.0, 0.0, 0.1, 0.0)
    assert cfg.activations == 'plain' and cfg.amp is None and cfg.workers == 1
    assert cfg.cache_images and cfg.compile
    # "40 epochs of 351 steps": 45,000 training images (50,000 less the 10% held out) at batch 128
    steps = 45000 // cfg.batch_size
    assert f'{cfg.epochs} epochs of {steps} steps' in text
    # "at most 10% of the 14,040 steps (decay 0.99929 ...)"
    total = cfg.epochs * steps
    decay = builders.ema_decay(cfg.model_ema_decay, cfg.model_ema_horizon, total)
    assert f'{total:,} steps' in text and f'decay\n# {decay:.5f}' in text
    assert cfg.model_ema and cfg.model_ema_decay == 0.99996 and cfg.model_ema_horizon == 0.1


# -- a short run on real images ---------------------------------------------------------------------------
def test_a_short_run_on_cifar_jpegs_keeps_the_better_of_model_and_ema(tmp_path):
    """A few epochs on 600 real CIFAR images with the preset: the best checkpoint and the summary are at least
    as good as the raw model's last validation, and metrics.csv and best.pth say which weights were kept."""
    data = _jpeg_slice(tmp_path / 'c10', 60)
    out = tmp_path / 'run'
    r = run_cli(['train', str(data), '--config', 'cifar10_scratch', '--epochs', '3', '--warmup-epochs', '1',
                 '-b', '32', '-j', '0', '--no-progress', '-o', str(out)], tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'validating on 60 (0.1 of' in r.stdout and 'held out (seed 42)' in r.stdout
    with open(out / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for row in rows:
        model, ema = float(row['top1']), float(row['ema_top1'])
        assert row['kept'] == ('ema' if ema >= model else 'model')
    best_row = max(rows, key=lambda row: max(float(row['top1']), float(row['ema_top1'])))
    best = max(float(best_row['top1']), float(best_row['ema_top1']))
    assert best >= float(rows[-1]['top1'])  # never worse than the raw model's last validation
    summary = re.search(r'best ([\d.]+)% top-1 \((model|EMA) weights', r.stdout)
    assert summary, r.stdout[-1000:]
    assert math.isclose(float(summary.group(1)), best, abs_tol=0.005)
    assert summary.group(2).lower() == best_row['kept']
    # best.pth serves the weights that validated best: the raw model's or the EMA's
    raw = load(out / 'best.pth')
    assert raw['kept'] == best_row['kept']
    served = read_checkpoint(out / 'best.pth').state_dict()
    source = raw['ema'] if raw['kept'] == 'ema' else raw['model']
    for k, v in served.items():
        assert torch.equal(v, source[k]), k
    # validate without DATA: the run's own held-out images (not all of DATA, which holds the training images),
    # with the weights best.pth serves, give the best epoch's number
    v = run_cli(['validate', '--checkpoint', str(out / 'best.pth'), '-j', '0', '--no-progress', '--json'],
                tmp_path, timeout=300)
    assert v.returncode == 0, v.stderr[-2000:]
    assert "validating on the run's held-out images: 0.1 of" in v.stderr
    got = json.loads(v.stdout.strip().splitlines()[-1])
    assert got['images'] == 60 and math.isclose(got['top1'], best, abs_tol=0.01)
    # the same DATA given explicitly is the same split
    v2 = run_cli(['validate', '--checkpoint', str(out / 'best.pth'), str(data), '-j', '0', '--no-progress',
                  '--json'], tmp_path)
    assert json.loads(v2.stdout.strip().splitlines()[-1])['images'] == 60


@pytest.mark.parametrize('name', ['cifar10_scratch_lite_32', 'cifar10_scratch_fast_lite_32',
                                  'cifar10_scratch_fast_7_32'])
def test_the_readme_curves_are_the_metrics_files_beside_them(name):
    """README's tables of the measured cifar10_scratch runs: each row is that epoch of docs/NAME.csv, and the
    best number quoted is that file's best."""
    text = (ROOT / 'README.md').read_text()
    marker = f'<!-- curve: docs/{name}.csv -->'
    section = text[text.index(marker) + len(marker):]
    section = section[:section.index('<!-- end curve -->')]
    with open(ROOT / 'docs' / f'{name}.csv') as f:
        rows = {int(r['epoch']): r for r in csv.DictReader(f)}
    table = re.findall(r'^\| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| (model|ema) \|$', section, re.M)
    assert len(table) >= 5
    minutes = 0.0
    for epoch in sorted(rows):
        minutes += float(rows[epoch]['time']) / 60
        rows[epoch]['minutes'] = round(minutes)
    for epoch, mins, top1, ema, kept in table:
        row = rows[int(epoch)]
        assert (float(row['top1']), float(row['ema_top1']), row['kept']) == (float(top1), float(ema), kept), epoch
        assert abs(row['minutes'] - int(mins)) <= 1, epoch
    best = max(rows.values(), key=lambda r: max(float(r['top1']), float(r['ema_top1'])))
    assert f"{max(float(best['top1']), float(best['ema_top1'])):.2f}%" in section


def test_the_readme_speed_tables_are_the_benchmark_file():
    text = (ROOT / 'README.md').read_text()
    start, end = '<!-- scratch-speed:start -->', '<!-- scratch-speed:end -->'
    section = text[text.index(start) + len(start):text.index(end)].strip()
    results = (ROOT / 'benchmarks' / 'RESULTS_scratch.md').read_text().split('\n', 2)[2].strip()
    assert section == results and 'Machine:' in section and '| t2t_vit_7_32 |' in section
