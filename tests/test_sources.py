"""WebDataset shards (`t2tvit prepare`, read through wids) and Hugging Face datasets files as training data."""

import functools
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from t2tvit import data as D
from t2tvit import sources
from t2tvit.cli import main
from train_helpers import QUICK, TINY, assert_same_tensors, load, write_folder
from train_helpers import fails_in_one_line as _one_error

pytest.importorskip('webdataset', reason='webdataset is not installed (pip install -e .[dev])')
pytest.importorskip('wids', reason='wids is not installed (pip install -e .[dev])')


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp('data') / 'shapes', train=10, val=4)


@pytest.fixture(scope='module')
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('shards') / 'shapes'
    assert main(['prepare', str(folder), str(out), '--shard-images', '7', '--no-progress']) == 0
    return out


def test_prepare_writes_every_image_once_with_its_class_and_a_manifest(folder, shards):
    from wids.wids import IndexedTarSamples

    manifest = json.loads((shards / 'manifest.json').read_text())
    assert manifest['classes'] == ['circle', 'square', 'stripes']
    train = manifest['splits']['train']
    assert train['images'] == 30 and [s['nsamples'] for s in train['shards']] == [7, 7, 7, 7, 2]
    assert manifest['splits']['val']['images'] == 12
    originals = {}
    for path in sorted((folder / 'train').rglob('*.*')):
        originals[path.read_bytes()] = path.parent.name
    seen = {}
    for entry in train['shards']:
        tar = shards / entry['url']
        assert tar.stat().st_size == entry['filesize']
        samples = IndexedTarSamples(path=str(tar))
        labels = []
        for j in range(len(samples)):
            s = samples[j]
            image = next(v for k, v in s.items() if k in ('.jpg', '.png')).read()
            cls = int(s['.cls'].read())
            assert s['.class.txt'].read().decode() == manifest['classes'][cls]
            seen[image] = manifest['classes'][cls]
            labels.append(cls)
        assert labels == entry['labels']
    assert seen == originals  # every file's own bytes, under its own class, once
    # the shuffle mixed the classes: no shard of 7 holds one class only
    assert all(len(set(s['labels'])) > 1 for s in train['shards'][:-1])


def test_shard_images_read_as_the_folder_does(folder, shards):
    by_bytes = {}
    for path in (folder / 'val').rglob('*.*'):
        by_bytes[D.load_image(path).tobytes()] = path.parent.name
    val = sources.Manifest(str(shards)).images('val')
    assert len(val) == 12 and val.classes == ['circle', 'square', 'stripes']
    for i in range(len(val)):
        assert by_bytes[val.image(i).tobytes()] == val.classes[val.targets[i]]


def _batches(images, world: int, rank: int, workers: int, epoch: int, skip: int = 0):
    transform = D.train_transform('timm', 32, (0.5,) * 3, (0.5,) * 3, 'bicubic', scale=(0.08, 1.0),
                                  ratio=(0.75, 4 / 3), hflip=0.5, color_jitter=0.4, auto_augment='rand-m9-mstd0.5-inc1',
                                  train_interpolation='random', reprob=0.25, remode='pixel', crop_pct=0.9)
    ds = D.AugmentedDataset(images, transform, seed=3)
    sampler = D.EpochSampler(ds, num_replicas=world, rank=rank, seed=3, groups=D.shard_groups(images))
    sampler.set_epoch(epoch)
    sampler.skip = skip
    loader = D.make_loader(ds, 4, sampler, workers, seed=3)
    return [(x, y) for x, y, _ in loader]


def test_shard_batches_do_not_depend_on_workers_ranks_or_the_resume_point(shards):
    images = sources.Manifest(str(shards / 'manifest.json')).images('train')
    groups = D.shard_groups(images)
    assert groups == [i // 7 for i in range(30)]
    one = _batches(images, 1, 0, 0, epoch=1)
    assert len(one) == 8
    for (xa, ya), (xb, yb) in zip(one, _batches(images, 1, 0, 2, epoch=1)):  # two loader processes
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # resumed after 3 batches: the same last 5 batches
    for (xa, ya), (xb, yb) in zip(one[3:], _batches(images, 1, 0, 0, epoch=1, skip=12)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # two ranks: every image of the epoch once (30 of 30, no padding needed), each augmented as on one rank
    keys = [k for r in range(2) for k in D.EpochSampler(images, 2, r, seed=3, groups=groups)]
    assert sorted(i for _, i in keys) == list(range(30))
    # the shuffle is shard-local: 8 shards a group, so this epoch's order reads shards in groups; the next differs
    s = D.EpochSampler(images, seed=3, groups=groups)
    s.set_epoch(2)
    assert [i for _, i in s] != [i for _, i in D.EpochSampler(images, seed=3, groups=groups)]


def _train(data, out, *extra):
    return ['train', str(data), *TINY, *QUICK, '--epochs', '2', '-b', '4', '--lr', '1e-3', '--output', str(out),
            '--model-ema-decay', '0.9', *extra]


def test_training_from_shards_resumes_bit_identical_and_validates(shards, tmp_path, capsys):
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    assert main(_train(shards, straight)) == 0
    assert main(_train(shards / 'manifest.json', split, '--stop-after-epochs', '1')) == 0
    assert main(_train(shards / 'manifest.json', split, '--resume', 'auto')) == 0
    a, b = load(straight / 'last.pth'), load(split / 'last.pth')
    for key in ('model', 'ema', 'optimizer', 'scheduler', 'epoch', 'step', 'rng'):
        assert_same_tensors(a[key], b[key], where=key)
    capsys.readouterr()
    assert main(['validate', '--checkpoint', str(straight / 'best.pth'), str(shards), '--no-progress',
                 '--json']) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['images'] == 12
    assert main(['predict', '--checkpoint', str(straight / 'best.pth'), str(shards), '--json', '--topk', '1']) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert len(predicted) == 12 and predicted[0]['image'].startswith(str(shards / 'val' / 'shard-000000.tar'))
    assert {p['top'][0]['class'] for p in predicted} <= {'circle', 'square', 'stripes'}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(shards):
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Quiet, directory=str(shards)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()


def test_shards_from_a_url_and_a_pipe_command_are_fetched_once_and_read_the_same(shards, served, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv('T2TVIT_SHARD_CACHE', str(tmp_path / 'cache'))
    local = sources.Manifest(str(shards)).images('train')
    for where in (f'{served}/manifest.json', f'pipe:cat {shards}/manifest.json'):
        remote = sources.Manifest(where).images('train')
        assert remote.targets == local.targets
        assert all(remote.image(i).tobytes() == local.image(i).tobytes() for i in (0, 13, 29))
        assert all(Path(p).is_file() and str(tmp_path / 'cache') in p for p in remote.paths)
    out = tmp_path / 'run'
    assert main(_train(f'{served}/manifest.json', out, '--epochs', '1')) == 0
    assert load(out / 'last.pth')['epoch'] == 1


def test_bad_shards_manifests_and_urls_are_one_line_errors(shards, tmp_path, capsys):
    broken = tmp_path / 'broken'
    shutil.copytree(shards, broken)
    tar = broken / 'train' / 'shard-000001.tar'
    tar.write_bytes(tar.read_bytes()[:5000])
    _one_error(capsys, _train(broken, tmp_path / 'o1'), 'shard-000001.tar', 'truncated', 'prepare again')
    tar.unlink()
    _one_error(capsys, _train(broken, tmp_path / 'o2'), 'names shard train/shard-000001.tar', 'missing')
    _one_error(capsys, _train('http://127.0.0.1:9/manifest.json', tmp_path / 'o3'),
               'http://127.0.0.1:9/manifest.json', 'cannot be read', 'reach')
    _one_error(capsys, _train('pipe:false', tmp_path / 'o4'), 'pipe:false', 'cannot be read')
    manifest = json.loads((shards / 'manifest.json').read_text())
    manifest['splits']['train']['shards'][0]['url'] = 'pipe:touch owned'
    (tmp_path / 'evil.json').write_text(json.dumps(manifest))
    _one_error(capsys, _train(tmp_path / 'evil.json', tmp_path / 'o6'), "names shard 'pipe:touch owned'",
               'relative to the manifest')
    assert not (tmp_path / 'owned').exists()
    (tmp_path / 'other.json').write_text('{"shards": []}')
    _one_error(capsys, _train(tmp_path / 'other.json', tmp_path / 'o5'), 'not a shard manifest')


def test_an_undecodable_image_in_a_shard_is_skipped_and_counted(tmp_path, capsys):
    root = write_folder(tmp_path / 'd', classes=('circle', 'square'), train=60, val=2, size=8)
    (root / 'train' / 'circle' / 'broken.png').write_bytes(b'not a png')  # 1 of 121: under 1%
    out = tmp_path / 'shards'
    assert main(['prepare', str(root), str(out), '--shard-images', '50', '--no-progress']) == 0
    capsys.readouterr()
    assert main(['train', str(out), *TINY, *QUICK, '-b', '11', '--epochs', '1', '--img-size', '32', '--mixup', '0',
                 '--cutmix', '0', '--output', str(tmp_path / 'o')]) == 0
    printed = capsys.readouterr().out
    assert 'skipped 1 training image(s) that failed to decode' in printed and 'shard-00000' in printed


def test_prepare_refuses_a_folder_that_holds_shards_and_writes_cifar_style_digits(shards, tmp_path, capsys):
    _one_error(capsys, ['prepare', str(tmp_path), str(shards)], 'already holds shards')
    assert main(['prepare', '--dataset', 'digits', str(tmp_path / 'digits'), '--no-progress']) == 0
    manifest = sources.Manifest(str(tmp_path / 'digits'))
    assert manifest.split('train')['images'] == 1437 and manifest.split('val')['images'] == 360


# -- Hugging Face datasets files ------------------------------------------------------------------------------
def _hf_dataset(folder: Path, split: str, count: int):
    datasets = pytest.importorskip('datasets', reason='datasets is not installed (pip install -e .[dev])')
    from PIL import Image

    paths = sorted((folder / split).rglob('*.*'))[:count]
    names = sorted({p.parent.name for p in paths})
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=names)})
    rows = {'image': [Image.open(p) for p in paths], 'label': [names.index(p.parent.name) for p in paths]}
    return datasets.Dataset.from_dict(rows, features=features)


def test_a_save_to_disk_folder_and_hub_style_parquet_train_and_validate(folder, tmp_path, capsys):
    datasets = pytest.importorskip('datasets', reason='datasets is not installed (pip install -e .[dev])')
    dd = datasets.DatasetDict({'train': _hf_dataset(folder, 'train', 30),
                               'validation': _hf_dataset(folder, 'val', 12)})
    saved = tmp_path / 'saved'
    dd.save_to_disk(str(saved))
    hub = tmp_path / 'hub'
    (hub / 'data').mkdir(parents=True)
    dd['train'].to_parquet(str(hub / 'data' / 'train-00000-of-00001.parquet'))
    dd['validation'].to_parquet(str(hub / 'data' / 'validation-00000-of-00001.parquet'))
    for data in (saved, hub):
        train, val = D.training_images('folder', str(data), 32)
        assert train.classes == ['circle', 'square', 'stripes'] and (len(train), len(val)) == (30, 12)
        assert train.image(3).size == (32, 32)
    out = tmp_path / 'run'
    assert main(_train(hub, out, '--epochs', '1')) == 0
    capsys.readouterr()
    assert main(['validate', '--checkpoint', str(out / 'best.pth'), str(saved), '--no-progress', '--json']) == 0
    assert json.loads(capsys.readouterr().out)['images'] == 12


def test_parquet_without_a_label_column_is_a_one_line_error(folder, tmp_path, capsys):
    ds = _hf_dataset(folder, 'train', 6).remove_columns('label')
    ds.to_parquet(str(tmp_path / 'train.parquet'))
    _one_error(capsys, _train(tmp_path / 'train.parquet', tmp_path / 'o', '--val-split', '0.5'),
               'train.parquet', 'no label column', 'image')


def test_without_the_datasets_package_the_error_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_datasets(name, *args, **kw):
        if name == 'datasets':
            raise ImportError('no datasets')
        return real(name, *args, **kw)

    (tmp_path / 'train.parquet').write_bytes(b'PAR1')
    monkeypatch.setattr(builtins, '__import__', no_datasets)
    _one_error(capsys, _train(tmp_path / 'train.parquet', tmp_path / 'o'), 'pip install "t2tvit[datasets]"')


def test_kind_of_data():
    assert sources.kind_of('pipe:cat x') == 'shards' and sources.kind_of('https://h/m.json') == 'shards'
    assert sources.kind_of(os.devnull) is None


def _readme_shard_commands():
    from conftest import ROOT

    readme = (ROOT / 'README.md').read_text()
    section = readme.split('### Data from shards and from datasets files', 1)[1].split('\n## ', 1)[0]
    block = section.split('```bash\n', 1)[1].split('```', 1)[0]
    return [ln.split('t2tvit ', 1)[1] for ln in block.splitlines() if ln.startswith('t2tvit ')]


def test_the_readme_shard_and_datasets_commands_run_in_small(folder, served, tmp_path, monkeypatch):
    """Each command of the README's shards section, on the tiny folder and a tiny model: prepare, train and
    validate from the shard folder, from the manifest's URL and a pipe: command, and from hub-style parquet."""
    import shlex

    pytest.importorskip('datasets', reason='datasets is not installed (pip install -e .[dev])')
    monkeypatch.setenv('T2TVIT_SHARD_CACHE', str(tmp_path / 'cache'))
    monkeypatch.chdir(tmp_path)
    hub = tmp_path / 'hub'
    (hub / 'data').mkdir(parents=True)
    _hf_dataset(folder, 'train', 30).to_parquet(str(hub / 'data' / 'train-00000-of-00001.parquet'))
    _hf_dataset(folder, 'val', 12).to_parquet(str(hub / 'data' / 'validation-00000-of-00001.parquet'))
    shards = tmp_path / 'imagenet-shards'
    where = {'/data/imagenet': str(folder), '/data/imagenet-shards': str(shards), '/data/imagenet-1k': str(hub),
             'https://datasets.example.com/imagenet-shards/manifest.json': f'{served}/manifest.json',
             'pipe:aws s3 cp s3://bucket/imagenet-shards/manifest.json -': f'pipe:cat {shards}/manifest.json'}
    commands = _readme_shard_commands()
    assert [c.split()[0] for c in commands] == ['prepare', 'train', 'validate', 'train', 'train', 'train']
    for command in commands:
        args = [where.get(a, a) for a in shlex.split(command)]
        if args[0] == 'prepare':
            args[args.index('--shard-images') + 1] = '7'
        if args[0] == 'train':
            i = args.index('--config')
            del args[i:i + 4]  # --config t2t_vit_14 -b 64: the ImageNet preset, here a tiny model
            args += [*TINY, *QUICK, '--epochs', '1', '-b', '4', '--overwrite']
        if args[0] == 'validate':
            args += ['--no-progress']
        assert main(args) == 0, command
    assert (shards / 'manifest.json').is_file() and load(tmp_path / 'runs' / 't2t_vit_14' / 'last.pth')['epoch'] == 1


def test_ablate_trains_its_variants_from_shards(shards, tmp_path):
    from t2tvit.analysis import ablate

    assert ablate.detect_dataset(str(shards)) == 'folder' and ablate.detect_dataset('pipe:cat m.json') == 'folder'
    lines = []
    result = ablate.run_ablation(str(shards / 'manifest.json'), epochs=1, seeds=1, img_size=8, variants=['wo_t2t'],
                                 jobs=1, out_dir=tmp_path, log=lines.append)
    assert [(r.variant, r.epochs) for r in result.runs] == [('wo_t2t', 1)]
    assert (tmp_path / 'runs' / 'wo_t2t-seed0' / 'last.pth').is_file()
