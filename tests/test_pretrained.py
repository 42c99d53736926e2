"""``pretrained=True`` and ``--pretrained``: the authors' releases from torch hub's cache, offline.

Reference-layout files written by the fixtures' ``official_ckpt.py`` stand in for the releases, under the
release file names in a temporary ``TORCH_HOME/hub/checkpoints/``; sockets are forbidden, so any attempt
to download fails the test instead of reaching the network.
"""
import argparse
import json
import socket

import pytest
import timm
import torch

import t2tvit
from conftest import load_json
from t2tvit.checkpoint import read_checkpoint
from t2tvit.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES, CIFAR_MEAN, CIFAR_STD
from t2tvit.cli import main
from t2tvit.errors import UserError
from t2tvit.models.t2t_vit import PRETRAINED, RELEASE_URL
from train_helpers import QUICK, load, write_folder

RELEASE = {'t2t_vit_7': '71.7_T2T_ViT_7.pth.tar', 't2t_vit_t_14': '81.7_T2T_ViTt_14.pth.tar'}
CIFAR10_14 = 'cifar10_t2t-vit_14_98.3.pth'


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError('network access is disabled in this test')
    monkeypatch.setattr(socket, 'socket', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)


@pytest.fixture(scope='module')
def releases(tmp_path_factory, fixtures_dir, official_ckpt):
    """Release-named files: the two parity models (timm layout, with the pickled run ``args`` the reference
    trainer stores) and a CIFAR-10 transfer of t2t_vit_14 (``{'net': ...}`` with a 10-class head)."""
    folder = tmp_path_factory.mktemp('releases')
    for name, file in RELEASE.items():
        path = folder / file
        official_ckpt.write_checkpoint(load_json(fixtures_dir / f'{name}.spec.json'), str(path), layout='timm')
        obj = torch.load(path, weights_only=True)
        obj['args'] = argparse.Namespace(model=name, lr=5e-4, batch_size=64, img_size=224)
        torch.save(obj, path)
    spec = load_json(fixtures_dir / 't2t_vit_14.spec.json')
    spec['keys'] = [[k, [10, *s[1:]] if k.startswith('head.') else s] for k, s in spec['keys']]
    official_ckpt.write_checkpoint(spec, str(folder / CIFAR10_14), layout='cifar')
    return folder, spec


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty ``TORCH_HOME``; returns its ``hub/checkpoints`` folder (where timm's cache looks)."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    cache = tmp_path / 'torch' / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    return cache


def _place(hub, releases, *files):
    for file in files:
        (hub / file).write_bytes((releases[0] / file).read_bytes())


def _inputs(official_ckpt, expected):
    return torch.from_numpy(official_ckpt.make_inputs(expected['input']['batch'], expected['input']['size']))


@pytest.mark.parametrize('name', sorted(RELEASE))
@pytest.mark.parametrize('factory', ['timm', 't2tvit'])
def test_pretrained_true_gives_the_reference_logits(name, factory, hub, releases, fixtures_dir, official_ckpt):
    _place(hub, releases, RELEASE[name])
    create = timm.create_model if factory == 'timm' else t2tvit.create_model
    model = create(name, pretrained=True).eval()
    expected = load_json(fixtures_dir / f'{name}.expected.json')
    with torch.no_grad():
        logits = model(_inputs(official_ckpt, expected))
    torch.testing.assert_close(logits, torch.tensor(expected['logits']), atol=1e-4, rtol=0)
    assert logits.topk(5).indices.tolist() == expected['top5']
    cfg = model.pretrained_cfg
    assert cfg['tag'] == 'in1k' and f"top-1 {PRETRAINED[name + '.in1k']['top1']}%" in cfg['description']


def test_new_head_and_image_size_are_fitted_as_checkpoint_path_does(hub, releases, caplog):
    _place(hub, releases, RELEASE['t2t_vit_7'])
    model = timm.create_model('t2t_vit_7', pretrained=True, num_classes=10, img_size=384)
    same = t2tvit.create_model('t2t_vit_7', checkpoint_path=str(hub / RELEASE['t2t_vit_7']), num_classes=10,
                               img_size=384)
    assert model.num_classes == 10 and model.pos_embed.shape == (1, 1 + 24 * 24, 256)
    mine, theirs = model.state_dict(), same.state_dict()
    for key in mine:
        if not key.startswith('head.'):
            assert torch.equal(mine[key], theirs[key]), key
    assert 'the head is re-initialised' in caplog.text


def test_missing_file_without_network_names_the_url_and_the_path(hub, tmp_path, capsys):
    path = hub / '81.5_T2T_ViT_14.pth.tar'
    url = RELEASE_URL + '81.5_T2T_ViT_14.pth.tar'
    with pytest.raises(UserError) as e:
        timm.create_model('t2t_vit_14', pretrained=True)
    assert url in str(e.value) and f'place it at {path}' in str(e.value)
    assert not path.exists()
    image = tmp_path / 'x.png'
    write_folder(tmp_path / 'img', classes=('cross',), train=1, val=0, size=32)
    (tmp_path / 'img' / 'train' / 'cross' / 'cross_000.png').rename(image)
    assert main(['predict', str(image), '--model', 't2t_vit_14', '--pretrained']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'Traceback' not in err
    assert url in err and str(path) in err


def test_a_model_without_released_weights_says_so(hub):
    with pytest.raises(UserError, match='t2t_vit_14_se has no released weights.*models --pretrained'):
        t2tvit.create_model('t2t_vit_14_se', pretrained=True)
    with pytest.raises(UserError, match=r'no such pretrained tag \(tags of t2t_vit_7: t2t_vit_7.in1k\)'):
        t2tvit.create_model('t2t_vit_7.in22k', pretrained=True)


def test_every_release_is_a_tag_with_its_data_config():
    tags = timm.list_pretrained('t2t_vit*')
    assert sorted(tags) == sorted(PRETRAINED) and len(tags) == 14
    files = {timm.models.get_pretrained_cfg(t).url.rsplit('/', 1)[1] for t in tags}
    assert 'cirfar100_t2t-vit-14_88.4.pth' in files and '84.2_T2T_ViT_24.pth.tar' not in files
    big = timm.models.get_pretrained_cfg('t2t_vit_14.in1k_384').to_dict()
    assert big['input_size'] == (3, 384, 384) and big['crop_pct'] == 1.0 and '83.3%' in big['description']
    assert timm.create_model('t2t_vit_14.in1k_384', pretrained=False).img_size == (384, 384)
    for tag, classes in (('t2t_vit_19.in1k_ft_cifar100', CIFAR100_CLASSES), ('t2t_vit_14.in1k_ft_cifar10',
                                                                             CIFAR10_CLASSES)):
        cfg = timm.models.get_pretrained_cfg(tag).to_dict()
        assert cfg['num_classes'] == len(classes) and cfg['label_names'] == classes
        assert cfg['mean'] == CIFAR_MEAN and cfg['std'] == CIFAR_STD and cfg['input_size'] == (3, 224, 224)
    assert len(set(CIFAR100_CLASSES)) == 100 and list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES)
    assert timm.models.get_pretrained_cfg('t2t_vit_t_24').tag == 'in1k'  # the plain name means in1k


def test_models_pretrained_lists_every_tag_and_whether_it_is_cached(hub, releases, capsys):
    _place(hub, releases, RELEASE['t2t_vit_7'])
    assert main(['models', '--pretrained']) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert set(rows) == set(PRETRAINED)
    for tag, release in PRETRAINED.items():
        assert rows[tag][1] == release['file'] and float(rows[tag][2]) == release['top1']
        assert rows[tag][-1] == ('yes' if tag == 't2t_vit_7.in1k' else 'no')
    assert lines[-1].startswith(f'cache: {hub} ')
    assert main(['models', '--pretrained', '--json', 't2t_vit_14.*']) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r['tag'] for r in listed] == [t for t in PRETRAINED if t.startswith('t2t_vit_14.')]
    assert all(r['path'] == str(hub / r['file']) and not r['cached'] for r in listed)


def test_cifar_tag_has_ten_classes_with_cifar_names(hub, releases, official_ckpt, tmp_path, capsys):
    _place(hub, releases, CIFAR10_14)
    model = timm.create_model('t2t_vit_14.in1k_ft_cifar10', pretrained=True).eval()
    assert model.num_classes == 10 and model.pretrained_cfg['label_names'] == CIFAR10_CLASSES
    weights = {k: torch.from_numpy(v) for k, v in official_ckpt.make_state_dict(releases[1]).items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    image = tmp_path / 'x.png'
    write_folder(tmp_path / 'img', classes=('cross',), train=1, val=0, size=32)
    (tmp_path / 'img' / 'train' / 'cross' / 'cross_000.png').rename(image)
    capsys.readouterr()
    assert main(['predict', str(image), '--model', 't2t_vit_14.in1k_ft_cifar10', '--pretrained', '--topk', '10',
                 '--json']) == 0
    top = json.loads(capsys.readouterr().out)[0]['top']
    assert sorted(t['class'] for t in top) == sorted(CIFAR10_CLASSES)


# -- --pretrained in the commands that take --checkpoint ----------------------------------------------------
@pytest.fixture
def hub7(hub, releases):
    _place(hub, releases, RELEASE['t2t_vit_7'])
    return hub


def test_validate_pretrained_is_validate_checkpoint(hub7, tmp_path, capsys):
    # two ImageNet synsets as class folders: the head's own classes
    data = write_folder(tmp_path / 'data', classes=('n01440764', 'n01443537'), train=1, val=2, size=64)
    common = [str(data), '--model', 't2t_vit_7', '--img-size', '64', '-j', '0', '--no-progress', '--json']
    assert main(['validate', *common, '--pretrained']) == 0
    pretrained = json.loads(capsys.readouterr().out)
    assert main(['validate', *common, '--checkpoint', str(hub7 / RELEASE['t2t_vit_7'])]) == 0
    checkpoint = json.loads(capsys.readouterr().out)
    assert pretrained['images'] == 4 and pretrained['loss'] == checkpoint['loss']
    with pytest.raises(SystemExit):
        main(['validate', *common, '--pretrained', '--checkpoint', 'x.pth'])
    assert 'not allowed with argument' in capsys.readouterr().err


def test_finetune_pretrained_starts_from_the_release(hub7, tmp_path):
    data = write_folder(tmp_path / 'two', classes=('cross', 'stripes'), train=4, val=2, size=64, seed=1)
    out = tmp_path / 'ft'
    assert main(['finetune', str(data), '--model', 't2t_vit_7', '--pretrained', *QUICK, '--img-size', '64',
                 '--epochs', '1', '-b', '4', '--transfer-ratio', '0', '--output', str(out)]) == 0
    ft = load(out / 'last.pth')
    assert ft['config']['model'] == 't2t_vit_7' and ft['config']['checkpoint'] == str(hub7 / RELEASE['t2t_vit_7'])
    assert ft['model']['head.weight'].shape == (2, 256)
    release = read_checkpoint(hub7 / RELEASE['t2t_vit_7']).ema
    assert torch.equal(ft['model']['blocks.0.attn.qkv.weight'], release['blocks.0.attn.qkv.weight'])


def test_export_pretrained_writes_the_release(hub7, tmp_path, capsys):
    out = tmp_path / 't2t_vit_7.pt'
    assert main(['export', '--model', 't2t_vit_7', '--pretrained', '--format', 'torchscript', '--img-size', '64',
                 '-o', str(out)]) == 0
    assert '(within' in capsys.readouterr().out
    scripted = torch.jit.load(str(out))
    reference = t2tvit.create_model('t2t_vit_7', checkpoint_path=str(hub7 / RELEASE['t2t_vit_7']), img_size=64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), reference.eval()(x), atol=1e-4, rtol=0)


def test_convert_pretrained_to_t2tvit_and_its_argument_check(hub7, tmp_path, capsys):
    out = tmp_path / 't2t_vit_7.safetensors'
    assert main(['convert', '--to', 't2tvit', '--model', 't2t_vit_7', '--pretrained', str(out)]) == 0
    rebuilt = t2tvit.create_model(None, checkpoint_path=str(out))
    release = read_checkpoint(hub7 / RELEASE['t2t_vit_7']).ema
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in release.items())
    assert main(['convert', '--to', 't2tvit', '--model', 't2t_vit_7', '--pretrained', str(out), 'x']) == 2
    assert 'give IN (a checkpoint file) or --pretrained' in capsys.readouterr().err


@pytest.mark.parametrize('tag', ['t2t_vit_7', 't2t_vit_14.in1k_ft_cifar10'])
def test_convert_to_hf_rebuilds_in_timm_local_dir(tag, hub, releases, tmp_path, official_ckpt):
    _place(hub, releases, RELEASE['t2t_vit_7'], CIFAR10_14)
    folder = tmp_path / 'hf'
    assert main(['convert', '--to', 'hf', '--model', tag, '--pretrained', str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ['config.json', 'model.safetensors']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == tag.split('.')[0]
    source = t2tvit.create_model(tag, pretrained=True).eval()
    rebuilt = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert tuple(rebuilt.pretrained_cfg['mean']) == source.pretrained_cfg['mean']
    labels = source.pretrained_cfg.get('label_names')
    assert rebuilt.pretrained_cfg.get('label_names') == (list(labels) if labels else None)
    x = torch.from_numpy(official_ckpt.make_inputs(2, 224))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), source(x))


def test_convert_to_hf_keeps_the_class_names_of_our_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = t2tvit.create_model('t2t_vit_lite_32', num_classes=3).eval()
    t2tvit.save_model(model, tmp_path / 'run.safetensors', class_names=['circle', 'square', 'stripes'])
    assert main(['convert', '--to', 'hf', str(tmp_path / 'run.safetensors'), str(tmp_path / 'hf')]) == 0
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    assert rebuilt.pretrained_cfg['label_names'] == ['circle', 'square', 'stripes']
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


# -- the README's Pretrained weights section, as written ------------------------------------------------------
def _readme_section() -> str:
    from conftest import ROOT
    readme = (ROOT / 'README.md').read_text()
    return readme[readme.index('## Pretrained weights'):readme.index('## Load a reference checkpoint')]


def test_readme_tag_table_is_the_model_table():
    from t2tvit.analysis.report import pretrained_markdown
    from t2tvit.factory import pretrained_tags
    section = _readme_section()
    start, end = '<!-- pretrained-table:start -->', '<!-- pretrained-table:end -->'
    assert section[section.index(start) + len(start):section.index(end)].strip() == pretrained_markdown(
        pretrained_tags())


def test_readme_pretrained_section_runs_offline(hub, releases, fixtures_dir, official_ckpt, tmp_path, monkeypatch,
                                                 capsys):
    import re
    import shlex
    for spec, file in (('t2t_vit_14', '81.5_T2T_ViT_14.pth.tar'), ('t2t_vit_14_384', '83.3_T2T_ViT_14.pth.tar')):
        official_ckpt.write_checkpoint(load_json(fixtures_dir / f'{spec}.spec.json'), str(hub / file))
    _place(hub, releases, CIFAR10_14)
    monkeypatch.chdir(tmp_path)
    section = _readme_section()
    python = re.findall(r'```python\n(.*?)```', section, flags=re.S)
    commands = [shlex.split(line)[1:] for block in re.findall(r'```bash\n(.*?)```', section, flags=re.S)
                for line in block.splitlines() if line.startswith('t2tvit ')]
    assert len(python) == 2 and len(commands) == 5
    first = {}
    exec(python[0], first)
    assert first['cifar'].num_classes == 10 and first['model'].pos_embed.shape == (1, 1 + 24 * 24, 384)
    assert first['model'].num_classes == 10
    for args in commands:
        if args[0] in ('models', 'convert'):  # the others need ImageNet/CIFAR/cat.jpg; their flags are tested above
            assert main(args) == 0, args
    listed = capsys.readouterr().out
    assert re.search(r'^t2t_vit_14\.in1k +81\.5_T2T_ViT_14\.pth\.tar +81\.5 +ImageNet-1k +yes$', listed, flags=re.M)
    assert re.search(r'^t2t_vit_14\.in1k_ft_cifar100 .* no$', listed, flags=re.M)
    second = {}
    exec(python[1], second)
    x = torch.from_numpy(official_ckpt.make_inputs(1, 224))
    with torch.no_grad():
        assert torch.equal(second['model'].eval()(x), t2tvit.create_model('t2t_vit_14', pretrained=True).eval()(x))


@pytest.mark.parametrize('name', sorted(RELEASE))
def test_pretrained_weights_read_gray_images_as_timm_adapts_them(name, hub, releases):
    # timm's test_model_load_pretrained: in_chans=1 with a new head or none, and features_only, all load
    _place(hub, releases, RELEASE[name])
    rgb = timm.create_model(name, pretrained=True, num_classes=0).eval()
    gray = timm.create_model(name, pretrained=True, in_chans=1, num_classes=0).eval()
    assert timm.create_model(name, pretrained=True, in_chans=1, num_classes=5).num_classes == 5
    x = torch.randn(2, 1, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y1, y3 = gray(x), rgb(x.expand(-1, 3, -1, -1))
        if name == 't2t_vit_7':
            # the RGB weights summed over channels: a gray image gives what its 3-channel copy gives
            torch.testing.assert_close(y1, y3, atol=1e-4, rtol=1e-4)
        else:
            # the Transformer T2T layer scales attention by its input width (a reference quirk kept for parity),
            # 49 values for a gray patch against 147: close, not equal
            assert torch.isfinite(y1).all() and torch.nn.functional.cosine_similarity(y1, y3).min() > 0.5
        # more channels repeat R, G, B at 3 / channels: an RGBR image whose 4th channel is 0 gives 3/4 of the
        # RGB image's first-layer response, so the model runs (finite) and differs from the RGB model
        four = timm.create_model(name, pretrained=True, in_chans=4, num_classes=0).eval()
        y = four(torch.cat([x.expand(-1, 3, -1, -1), x], dim=1))
        assert y.shape == (2, rgb.num_features) and torch.isfinite(y).all()
    features = timm.create_model(name, pretrained=True, features_only=True).eval()
    assert len(features(torch.randn(1, 3, 224, 224))) == 3


def test_serve_pretrained_serves_the_release_with_imagenet_names(hub7, official_ckpt, fixtures_dir):
    pytest.importorskip('fastapi', reason="t2tvit serve needs FastAPI (pip install 't2tvit[serve]')")
    from t2tvit.serve.model import load_served_model
    served = load_served_model('t2t_vit_7', pretrained=True, device='cpu')
    assert served.name == 't2t_vit_7.in1k' and served.weights == 'pretrained t2t_vit_7.in1k'
    assert len(served.class_names) == 1000 and served.class_names[0].startswith('tench')
    assert served.preprocessing['img_size'] == 224 and served.preprocessing['crop_pct'] == 0.9
    expected = load_json(fixtures_dir / 't2t_vit_7.expected.json')
    with torch.no_grad():
        logits = served.model(_inputs(official_ckpt, expected))
    torch.testing.assert_close(logits, torch.tensor(expected['logits']), atol=1e-4, rtol=0)
