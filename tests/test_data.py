"""Datasets: folder trees, CIFAR archives on disk, the built-in digits, seeded augmentation, samplers."""

import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from t2tvit import data as D
from t2tvit.errors import UserError
from train_helpers import write_folder


def test_digits_split_is_fixed_stratified_and_upsampled():
    train, val = D.DigitsImages(train=True, size=32), D.DigitsImages(train=False, size=32)
    assert (len(train), len(val)) == (1437, 360)
    assert not set(train.indices) & set(val.indices)
    assert np.array_equal(D.DigitsImages(train=False).indices, val.indices)  # the same split every time
    counts = np.bincount(val.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of each class (174..183 per class)
    img = val.image(0)
    assert img.size == (32, 32) and img.mode == 'RGB'


def test_folder_tree_gives_sorted_classes_and_every_image(tmp_path):
    root = write_folder(tmp_path / 'd', train=3, val=2)
    train, val = D.training_images('folder', str(root), 32)
    assert train.classes == ['circle', 'square', 'stripes'] and val.classes == train.classes
    assert len(train) == 9 and len(val) == 6
    assert sorted(set(train.targets)) == [0, 1, 2]
    assert train.image(0).mode == 'RGB'


@pytest.mark.parametrize(
    'breakage, message',
    [
        ('missing', 'no such folder'),
        ('no_train', 'no train folder'),
        ('no_val', 'no val folder'),
        ('empty_class', 'no images found in'),
        ('extra_val_class', 'not among'),
    ],
)
def test_folder_problems_are_user_errors(tmp_path, breakage, message):
    root = write_folder(tmp_path / 'd', train=2, val=1)
    if breakage == 'missing':
        root = tmp_path / 'nowhere'
    elif breakage == 'no_train':
        (root / 'train').rename(root / 'training')
    elif breakage == 'no_val':
        (root / 'val').rename(root / 'held_out')
    elif breakage == 'empty_class':
        (root / 'train' / 'empty').mkdir()
        (root / 'train' / 'empty' / 'notes.txt').write_text('not an image')
    elif breakage == 'extra_val_class':
        (root / 'val' / 'zebra').mkdir()
        Image.new('RGB', (8, 8)).save(root / 'val' / 'zebra' / 'z.png')
    with pytest.raises(UserError, match=message):
        D.training_images('folder', str(root), 32)


def test_any_image_mode_becomes_rgb_with_white_for_transparency():
    rgba = Image.new('RGBA', (4, 4), (255, 0, 0, 0))
    assert D.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert D.to_rgb(Image.new('L', (4, 4), 100)).getpixel((0, 0)) == (100, 100, 100)
    cmyk = D.to_rgb(Image.new('CMYK', (4, 4), (0, 255, 255, 0)))
    assert cmyk.mode == 'RGB' and cmyk.getpixel((0, 0))[0] > 200
    assert D.to_rgb(Image.new('P', (4, 4))).mode == 'RGB'


def test_one_loader_reads_every_image_and_names_a_bad_file(tmp_path):
    from t2tvit.analysis import visualize

    assert visualize.load_image is D.load_image
    good = tmp_path / 'a.png'
    Image.new('LA', (4, 4), (10, 0)).save(good)
    assert D.load_image(good).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(UserError, match='missing.png: no such image file'):
        D.load_image(tmp_path / 'missing.png')
    bad = tmp_path / 'bad.jpg'
    bad.write_bytes(b'\xff\xd8\xff not a jpeg')
    with pytest.raises(UserError, match='bad.jpg: cannot be read as an image'):
        D.load_image(bad)


def test_preprocessing_is_the_run_s_then_cifar_s_then_the_model_s():
    import t2tvit
    from timm.data import IMAGENET_DEFAULT_MEAN

    from t2tvit.cifar import CIFAR_MEAN

    with torch.device('meta'):
        plain = t2tvit.create_model('t2t_vit_7', img_size=160)
        cifar_tag = t2tvit.create_model('t2t_vit_14.in1k_ft_cifar10')
    assert D.resolve_preprocessing(plain) == {'img_size': 160, 'in_chans': 3, 'mean': IMAGENET_DEFAULT_MEAN,
                                              'std': (0.229, 0.224, 0.225), 'crop_pct': 0.9,
                                              'interpolation': 'bicubic'}
    assert D.resolve_preprocessing(plain, dataset='cifar10')['mean'] == CIFAR_MEAN
    tagged = D.resolve_preprocessing(cifar_tag)  # the CIFAR transfer release's own settings
    assert (tagged['mean'], tagged['crop_pct'], tagged['interpolation']) == (CIFAR_MEAN, 1.0, 'bilinear')
    given = D.resolve_preprocessing(plain, {'mean': (0.5,) * 3, 'crop_pct': 0.875, 'std': None, 'img_size': 64},
                                    dataset='cifar10')
    assert (given['mean'], given['crop_pct'], given['img_size']) == ((0.5,) * 3, 0.875, 64)
    assert given['std'] == (0.2023, 0.1994, 0.2010)  # None: not given, so CIFAR's


def _write_cifar10(folder, per_batch=4):
    base = folder / 'cifar-10-batches-py'
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
    for n in names:
        batch = {
            b'data': rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
            b'labels': [int(x) for x in rng.integers(0, 10, per_batch)],
        }
        with open(base / n, 'wb') as f:
            pickle.dump(batch, f, protocol=2)
    with open(base / 'batches.meta', 'wb') as f:
        pickle.dump(
            {
                b'label_names': [
                    c.encode()
                    for c in (
                        'airplane',
                        'automobile',
                        'bird',
                        'cat',
                        'deer',
                        'dog',
                        'frog',
                        'horse',
                        'ship',
                        'truck',
                    )
                ]
            },
            f,
            protocol=2,
        )
    return base


def test_cifar_archives_are_read_from_disk(tmp_path):
    base = _write_cifar10(tmp_path)
    train, test = D.training_images('cifar10', str(tmp_path), 32)
    assert len(train) == 20 and len(test) == 4
    assert train.classes[0] == 'airplane' and len(train.classes) == 10
    with open(base / 'data_batch_1', 'rb') as f:
        first = pickle.load(f)
    pixels = np.asarray(train.image(0))
    assert pixels.shape == (32, 32, 3)
    assert np.array_equal(pixels[..., 0].ravel(), first[b'data'][0][:1024])  # channel-planar rows -> HWC


def test_cifar_missing_files_name_what_goes_where(tmp_path):
    base = _write_cifar10(tmp_path)
    (base / 'test_batch').unlink()
    with pytest.raises(
        UserError, match=r'cifar-10-batches-py/ holds .*missing: test_batch.*nothing is downloaded'
    ):
        D.training_images('cifar10', str(tmp_path), 32)


class _Evil:
    def __reduce__(self):
        return (print, ('code ran',))


def test_cifar_reader_refuses_pickled_code(tmp_path, capsys):
    base = _write_cifar10(tmp_path)
    with open(base / 'batches.meta', 'wb') as f:
        pickle.dump({b'label_names': _Evil()}, f, protocol=2)
    with pytest.raises(UserError, match='not a CIFAR python archive'):
        D.training_images('cifar10', str(tmp_path), 32)
    assert 'code ran' not in capsys.readouterr().out


def _run_settings(**given):
    """The augmentation settings of a run with RunConfig's defaults, ``given`` overriding them."""
    from t2tvit.engine.config import RunConfig
    from t2tvit.engine.run import TRAIN_TRANSFORM_KEYS
    return {**{k: getattr(RunConfig(), k) for k in TRAIN_TRANSFORM_KEYS}, **given}


def _augmented(tmp_path, seed=0):
    root = write_folder(tmp_path / 'd', train=2, val=1)
    images, _ = D.training_images('folder', str(root), 32)
    t = D.train_transform('timm', 32, (0.5,) * 3, (0.5,) * 3, 'bicubic',
                          **_run_settings(auto_augment='rand-m9-mstd0.5-inc1', reprob=0.25))
    return D.AugmentedDataset(images, t, seed=seed)


def test_augmentation_depends_on_seed_epoch_and_image_only(tmp_path):
    ds = _augmented(tmp_path)
    a = ds[(3, 1)][0]
    ds[(3, 0)], ds[(4, 1)]  # other reads in between change nothing
    assert torch.equal(ds[(3, 1)][0], a)
    assert not torch.equal(ds[(4, 1)][0], a)  # another epoch, another augmentation
    state = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    ds[(5, 1)]
    assert torch.equal(torch.get_rng_state(), state[0])  # the caller's generators are left alone
    assert np.array_equal(np.random.get_state()[1], state[1]) and random.getstate() == state[2]


def test_epoch_sampler_ranks_split_the_single_process_order(tmp_path):
    ds = list(range(24))
    single = D.EpochSampler(ds, num_replicas=1, rank=0, seed=7)
    single.set_epoch(2)
    order = [i for _, i in single]
    ranks = []
    for r in range(2):
        s = D.EpochSampler(ds, num_replicas=2, rank=r, seed=7)
        s.set_epoch(2)
        ranks.append([i for _, i in s])
    # global batch 8 = 2 ranks x 4: each step's images are the single process's batch of 8
    for step in range(3):
        assert sorted(ranks[0][4 * step : 4 * step + 4] + ranks[1][4 * step : 4 * step + 4]) == sorted(
            order[8 * step : 8 * step + 8]
        )
    single.skip = 8
    assert [i for _, i in single] == order[8:] and len(single) == 16
    assert all(e == 2 for e, _ in single)


def test_undecodable_images_are_dropped_from_the_batch_and_reported(tmp_path):
    root = write_folder(tmp_path / 'd', train=2, val=1)
    bad = root / 'train' / 'circle' / 'broken.jpg'
    bad.write_bytes(b'\xff\xd8 this is not a jpeg')
    images, _ = D.training_images('folder', str(root), 32)
    ds = D.AugmentedDataset(images, D.eval_transform(32, (0.5,) * 3, (0.5,) * 3, 1.0, 'bicubic'))
    batch = D.collate([ds[i] for i in range(len(ds))])
    assert batch[0].shape == (6, 3, 32, 32) and len(batch[1]) == 6
    assert batch[2] == [str(bad)]


def test_randaugment_at_full_magnitude_never_fails():
    # magnitude 10 makes 'PosterizeIncreasing' keep 0 bits, which Pillow >= 11 refuses
    t = D.train_transform('timm', 32, (0.5,) * 3, (0.5,) * 3, 'bicubic',
                          **_run_settings(auto_augment='rand-m10-n6-mstd0-inc1'))
    img = Image.new('RGB', (32, 32), (120, 200, 40))
    for seed in range(30):
        random.seed(seed)
        assert t(img).shape == (3, 32, 32)


@pytest.mark.parametrize('remode', ['pixel', 'rand'])
def test_staged_batches_cross_the_loader_as_uint8_and_equal_the_float_pipeline(remode):
    """Training ships uint8 (a quarter of the bytes) and normalises and erases on the device: the same tensors."""
    transform = D.train_transform('timm', 48, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 'bicubic',
                                  scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=0.4,
                                  auto_augment='rand-m9-mstd0.5-inc1', train_interpolation='random', reprob=0.5,
                                  remode=remode, crop_pct=0.9)
    staged = D.StagedTransform.split(transform)
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)) for _ in range(24)]

    class Pictures(D.LabelledImages):
        classes, targets = ['a', 'b'], [i % 2 for i in range(24)]

        def image(self, i):
            return pictures[i]

    loaders = [D.make_loader(D.AugmentedDataset(Pictures(), t, seed=5), 8, D.EpochSampler(range(24), seed=5), 2)
               for t in (transform, staged)]
    erased = 0
    for (xf, yf, _), (xs, ys, _) in zip(*loaders):
        assert isinstance(xs, D.StagedBatch) and xs.pixels.dtype == torch.uint8
        erased += sum(map(len, xs.erased))
        assert torch.equal(xf, xs.to('cpu')) and torch.equal(yf, ys)
        assert torch.equal(xs[:-1].to('cpu'), xf[:-1])  # mixup's even batch
    assert 4 <= erased <= 20  # random erasing drew in about half the images, as the float pipeline did
    assert D.StagedTransform.split(D.eval_transform(32, (0.5,) * 3, (0.5,) * 3, 0.9, 'bicubic')) is not None
    assert D.StagedTransform.split(lambda img: img) is None


def test_cifar_archives_prepare_to_shards_with_the_same_pixels(tmp_path):
    pytest.importorskip('wids', reason='wids is not installed (pip install -e .[dev])')
    from t2tvit import sources

    _write_cifar10(tmp_path / 'c')
    sources.prepare('cifar10', str(tmp_path / 'c'), str(tmp_path / 's'), shard_images=8)
    train, test = D.training_images('cifar10', str(tmp_path / 'c'), 32)
    s_train, s_test = D.training_images('folder', str(tmp_path / 's'), 32)
    assert s_train.classes == train.classes and (len(s_train), len(s_test)) == (20, 4)
    original = {np.asarray(train.image(i)).tobytes(): train.targets[i] for i in range(20)}
    assert {np.asarray(s_train.image(i)).tobytes(): s_train.targets[i] for i in range(20)} == original  # PNG: lossless
