"""--cache-images: images decoded once into memory, cropped and flipped in batches; --compile; the unset --amp.

The in-memory batches must be the per-image pipeline's, pixel for pixel, for the crop and flip they drew; the
draws must have the recipe's distribution and depend on (seed, epoch, image) only, so that a resumed run sees
the very same batches as one that never stopped.
"""
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.transforms import functional as TF

from train_helpers import (QUICK, TINY, assert_same_tensors, load, run_cli, run_cli_signalled_at_step, subprocess_env,
                           write_folder)

from t2tvit import data as D
from t2tvit.engine import builders
from t2tvit.errors import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    root = write_folder(tmp_path_factory.mktemp('mem') / 'data', train=6, val=2)
    return D.FolderImages(root / 'train')


def _draws(seed, epoch, index, padding=4, hflip=0.5):
    span = np.uint64(2 * padding + 1)
    dy = D.key_randoms(seed, epoch, index, 0) % span
    dx = D.key_randoms(seed, epoch, index, 1) % span
    flip = (D.key_randoms(seed, epoch, index, 2) >> np.uint64(11)).astype(np.float64) * 2.0**-53 < hflip
    return dy.astype(int), dx.astype(int), flip


def test_memory_batches_are_the_per_image_pipeline_pixel_for_pixel(images):
    old = D.train_transform('pad-crop', 32, MEAN, STD, 'bicubic', scale=None, ratio=None, hflip=0.0,
                            color_jitter=0.0, auto_augment=None, train_interpolation='bicubic', reprob=0.0,
                            remode='pixel', crop_pct=0.9)
    cache = D.DecodedImages(images, D.memory_prepare('pad-crop', 32, MEAN, STD, 0.9, 'bicubic'), 32)
    sampler = D.EpochSampler(cache, seed=5)
    sampler.set_epoch(2)
    loader = D.MemoryLoader(cache, 7, sampler, MEAN, STD, (4, 0.5), drop_last=True, seed=11)
    keys = list(sampler)[:7]
    x, targets, failed = next(iter(loader))
    index = torch.tensor([i for _, i in keys])
    dy, dx, flip = _draws(11, 2, index)
    assert failed == [] and targets.tolist() == [images.targets[i] for i in index.tolist()]
    for j, i in enumerate(index.tolist()):
        img = TF.crop(TF.pad(old.transforms[0](images.image(i)), 4), int(dy[j]), int(dx[j]), 32, 32)
        img = TF.hflip(img) if flip[j] else img
        expected = old.transforms[4](old.transforms[3](img))  # ToTensor, Normalize
        assert torch.equal(x[j], expected), j
    # validation: timm's eval transform (resize by crop_pct, center crop) exactly
    val = D.DecodedImages(images, D.memory_prepare('none', 32, MEAN, STD, 0.9, 'bicubic'), 32)
    vx, _, _ = next(iter(D.MemoryLoader(val, 5, D.ShardSampler(len(val)), MEAN, STD)))
    ev = D.eval_transform(32, MEAN, STD, 0.9, 'bicubic')
    for j in range(5):
        assert torch.equal(vx[j], ev(images.image(j)))


def test_crop_and_flip_draws_have_the_recipes_distribution_and_depend_on_the_image_only():
    index = torch.arange(90_000)
    dy, dx, flip = _draws(42, 0, index)
    for offsets in (dy, dx):
        counts = np.bincount(offsets, minlength=9)
        assert len(counts) == 9 and abs(counts - 10_000).max() < 400  # uniform over the 9 positions (4 sigma)
    assert abs(flip.mean() - 0.5) < 0.01
    assert np.corrcoef(dy, dx)[0, 1] < 0.02
    # an image's draw is the same in any batch, and another epoch or seed draws anew
    some = torch.tensor([5, 70_000, 12])
    assert [d[[5, 70_000, 12]].tolist() for d in (dy, dx)] == [d.tolist() for d in _draws(42, 0, some)[:2]]
    assert (_draws(42, 1, index)[0] != dy).mean() > 0.8 and (_draws(43, 0, index)[0] != dy).mean() > 0.8


def test_undecodable_images_are_dropped_and_named_every_time_they_are_drawn(tmp_path):
    root = write_folder(tmp_path / 'data', train=4, val=1)
    broken = root / 'train' / 'circle' / 'circle_000.png'
    broken.write_bytes(b'not a png')
    images = D.FolderImages(root / 'train')
    cache = D.DecodedImages(images, D.memory_prepare('pad-crop', 32, MEAN, STD, 0.9, 'bicubic'), 32)
    assert int(cache.ok.sum()) == len(images) - 1
    loader = D.MemoryLoader(cache, len(images), D.ShardSampler(len(images)), MEAN, STD, (4, 0.5))
    x, targets, failed = next(iter(loader))
    assert len(x) == len(images) - 1 == len(targets) and failed == [str(broken)]


def test_images_of_other_sizes_and_per_image_augmentation_are_one_line_errors(tmp_path):
    root = tmp_path / 'wide'
    write_folder(root, train=2, val=1)
    from PIL import Image
    Image.new('RGB', (48, 32)).save(root / 'train' / 'circle' / 'wide.png')
    images = D.FolderImages(root / 'train')
    with pytest.raises(UserError, match='wide.png is 48x32 after the resize to 32px, not square.*drop --cache-images'):
        D.DecodedImages(images, D.memory_prepare('pad-crop', 32, MEAN, STD, 0.9, 'bicubic'), 32)
    with pytest.raises(UserError, match='--augment pad-crop or none'):
        D.memory_prepare('timm', 32, MEAN, STD, 0.9, 'bicubic')
    r = run_cli(['train', str(root), *TINY, *QUICK, '--epochs', '1', '-b', '2', '--cache-images', '-o',
                 str(tmp_path / 'run')], tmp_path)
    assert r.returncode == 2 and 'Traceback' not in r.stderr and '--augment pad-crop or none' in r.stderr


def test_sigterm_mid_epoch_with_images_in_memory_resumes_to_the_same_weights(tmp_path):
    folder = write_folder(tmp_path / 'data', train=20, val=2)  # 30 steps of batch 2 per epoch
    args = ['train', str(folder), *TINY, *QUICK, '--epochs', '2', '-b', '2', '--lr', '1e-3', '--augment', 'pad-crop',
            '--hflip', '0.5', '--model-ema-decay', '0.9', '--cache-images', '--no-amp']
    ref = run_cli([*args, '--output', str(tmp_path / 'ref')], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert 'images in memory: 60 training and 6 validation images decoded once' in ref.stdout
    out = tmp_path / 'run'
    stopped = run_cli_signalled_at_step(7, signal.SIGTERM, [*args, '--output', str(out)], cwd=tmp_path)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    resumed = run_cli([*args, '--output', str(out), '--resume', 'auto'], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load(tmp_path / 'ref' / 'last.pth'), load(out / 'last.pth')
    for key in ('model', 'ema', 'optimizer', 'step', 'epoch'):
        assert_same_tensors(a[key], b[key], where=key)


def test_compiled_training_writes_plain_checkpoints(tmp_path):
    folder = write_folder(tmp_path / 'data', train=4, val=2)
    out = tmp_path / 'run'
    r = run_cli(['train', str(folder), *TINY, *QUICK, '--epochs', '1', '-b', '4', '--compile', '--no-amp',
                 '-o', str(out)], tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = load(out / 'last.pth')
    assert not any(k.startswith('_orig_mod') for k in ckpt['model']), list(ckpt['model'])[:3]
    assert ckpt['config']['compile'] is True
    v = run_cli(['validate', '--checkpoint', str(out / 'last.pth'), str(folder), '-j', '0', '--no-progress'],
                tmp_path)
    assert v.returncode == 0, v.stderr[-2000:]


def test_unset_amp_autocasts_where_it_pays(monkeypatch):
    assert builders.autocast_pays(torch.device('cuda'))
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: True)
    assert builders.autocast_pays(torch.device('cpu'))
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False)
    assert not builders.autocast_pays(torch.device('cpu'))
    # an explicit --amp / --no-amp wins; autocast_setup itself keeps None as CUDA only (validate of other files)
    assert builders.autocast_setup(torch.device('cpu'), None, 'auto')[1] is None
    assert builders.autocast_setup(torch.device('cpu'), True, 'auto')[1] == torch.bfloat16


@pytest.mark.parametrize('amx, precision', [(True, 'cpu bfloat16'), (False, 'cpu fp32')])
def test_the_unset_amp_trains_in_bf16_only_on_cpus_with_amx(tmp_path, amx, precision):
    folder = write_folder(tmp_path / 'data', train=2, val=1)
    script = (f'import torch; torch.cpu._is_amx_tile_supported = lambda: {amx}\n'
              'import sys; from t2tvit.cli import main; sys.exit(main(sys.argv[1:]))')
    r = subprocess.run([sys.executable, '-c', script, 'train', str(folder), *TINY, *QUICK, '--epochs', '1', '-b', '2',
                        '-o', str(tmp_path / 'run')], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'1 process(es) x batch 2, {precision}' in r.stdout, r.stdout[-1500:]
