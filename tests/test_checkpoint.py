"""Every checkpoint layout loads into the right model, and bad files fail with one clear line."""
import argparse
import logging
import os
import pickle
import subprocess
import sys
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t2tvit
from conftest import FIXTURES, ROOT, load_json
from t2tvit.checkpoint import (
    TRAIN_FORMAT,
    CheckpointError,
    atomic_save,
    convert_checkpoint,
    load_checkpoint,
    passl_to_reference,
    read_checkpoint,
    save_model,
)
from t2tvit.cli import main
from t2tvit.errors import UserError
from t2tvit.layers.pos_table import sinusoid_table

SPECS = sorted(p.name[:-len('.spec.json')] for p in FIXTURES.glob('*.spec.json')) or ['(no fixtures)']


@cache
def _meta_model(name, img_size=None):
    with torch.device('meta'):
        return t2tvit.create_model(name, img_size=img_size)


def _tensors(sd):
    return {k: torch.as_tensor(v) for k, v in sd.items()}


def _assert_state_equal(model, expected):
    got = model.state_dict()
    assert list(got) == list(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, atol=0, rtol=0, msg=k)


@pytest.fixture(scope='module')
def spec7(fixtures_dir):
    return load_json(fixtures_dir / 't2t_vit_7.spec.json')


@pytest.fixture(scope='module')
def weights7(spec7, official_ckpt):
    """The EMA and raw weights the fixture writer puts in t2t_vit_7 reference files."""
    return (_tensors(official_ckpt.make_state_dict(spec7, ema=True)),
            _tensors(official_ckpt.make_state_dict(spec7, ema=False)))


@pytest.fixture(scope='module')
def reference7(spec7, official_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp('ref') / 'T2T_ViT_7.pth.tar'
    official_ckpt.write_checkpoint(spec7, str(path), layout='timm')
    return path


def _train_checkpoint(path, model, ema, name, model_kwargs, class_names):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    obj = {'format': TRAIN_FORMAT, 'version': 1, 'model': model.state_dict(),
           'ema': ema.state_dict() if ema is not None else None, 'optimizer': opt.state_dict(), 'scheduler': None,
           'scaler': None, 'rng': {'world_size': 1, 'ranks': [{'torch': torch.get_rng_state()}]}, 'epoch': 3,
           'step': 30, 'config': {'model': name, 'model_kwargs': model_kwargs, 'lr': 0.1}, 'class_names': class_names}
    atomic_save(obj, path)
    return path


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """A training checkpoint of a 10-class t2t_vit_7_32, like ``runs/demo/best.pth``."""
    torch.manual_seed(0)
    kwargs = {'img_size': 32, 'num_classes': 10}
    model = t2tvit.create_model('t2t_vit_7_32', **kwargs)
    ema = t2tvit.create_model('t2t_vit_7_32', **kwargs)
    path = tmp_path_factory.mktemp('run') / 'best.pth'
    _train_checkpoint(path, model, ema, 't2t_vit_7_32', kwargs, [str(i) for i in range(10)])
    return path, model, ema


# -- the reference key layout ---------------------------------------------------------------------
@pytest.mark.parametrize('spec_name', SPECS)
def test_state_dict_keys_and_shapes_are_the_reference(spec_name, fixtures_dir):
    spec = load_json(fixtures_dir / f'{spec_name}.spec.json')
    assert set(spec['kwargs']) <= {'img_size'}
    model = _meta_model(spec['model'], spec['kwargs'].get('img_size'))
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == spec['keys']


# -- layouts --------------------------------------------------------------------------------------
def test_reference_release_prefers_ema_and_reads_raw_on_request(reference7, weights7):
    ema, raw = weights7
    model = t2tvit.create_model('t2t_vit_7', checkpoint_path=str(reference7))
    assert model.num_classes == 1000
    _assert_state_equal(model, ema)
    load_checkpoint(model, reference7, use_ema=False)
    _assert_state_equal(model, raw)


@pytest.mark.parametrize('layout', ['cifar', 'plain'])
def test_cifar_and_plain_layouts_load(layout, spec7, weights7, official_ckpt, tmp_path):
    path = tmp_path / f'{layout}.pth'
    official_ckpt.write_checkpoint(spec7, str(path), layout=layout)
    assert read_checkpoint(path).layout == layout
    _assert_state_equal(t2tvit.create_model('t2t_vit_7', checkpoint_path=str(path)), weights7[0])


def test_reference_release_with_pickled_run_arguments_loads(weights7, tmp_path):
    path = tmp_path / 'with_args.pth.tar'
    torch.save({'epoch': 309, 'arch': 'T2t_vit_7', 'args': argparse.Namespace(model='T2t_vit_7', lr=5e-4),
                'state_dict': {'module.' + k: v for k, v in weights7[1].items()}, 'state_dict_ema': weights7[0]},
               path)
    # the reference's ``arch`` names the model, so no name is needed
    _assert_state_equal(t2tvit.create_model(None, checkpoint_path=str(path)), weights7[0])


@pytest.fixture(scope='module')
def passl7(fixtures_dir):
    path = str(fixtures_dir / 'passl_t2t_vit_7.pdparams')
    return path, t2tvit.create_model('t2t_vit_7', checkpoint_path=path).eval()


def test_passl_file_gives_reference_logits(passl7, fixtures_dir, official_ckpt):
    expected = load_json(fixtures_dir / 't2t_vit_7.expected.json')
    assert read_checkpoint(passl7[0]).layout == 'passl'
    model = passl7[1]
    x = torch.from_numpy(official_ckpt.make_inputs(expected['input']['batch'], expected['input']['size']))
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits, torch.tensor(expected['logits']), atol=1e-4, rtol=0)


def test_passl_linear_weights_are_transposed_by_name_not_shape(weights7):
    model = _meta_model('t2t_vit_7')
    linear = {f'{n}.weight' for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ema = weights7[0]
    assert ema['blocks.0.attn.proj.weight'].shape[0] == ema['blocks.0.attn.proj.weight'].shape[1]  # square
    paddle = {}
    for k, v in ema.items():
        key = 'head.fc_cls.' + k[5:] if k.startswith('head.') else 'backbone.' + k
        paddle[key] = v.t().contiguous() if k in linear else v
    for converted in (passl_to_reference(paddle), passl_to_reference(paddle, linear_weights=linear)):
        assert list(converted) == list(ema)
        for k, v in ema.items():
            assert torch.equal(converted[k], v), k  # the Performer's 2-D ``w`` stays as it is


def test_two_dimensional_weights_are_linear_in_every_registered_model():
    """What ``passl_to_reference`` relies on when it is not given the model's Linear weights."""
    for name in t2tvit.list_models():
        model = _meta_model(name)
        modules = dict(model.named_modules())
        for key, value in model.state_dict().items():
            owner, _, leaf = key.rpartition('.')
            if leaf == 'weight' and value.ndim == 2:
                assert isinstance(modules[owner], nn.Linear), f'{name}: {key}'


def test_training_checkpoint_rebuilds_its_model_with_ema_weights(demo_run, tmp_path):
    path, model, ema = demo_run
    rebuilt = t2tvit.create_model('t2t_vit_7_32', checkpoint_path=str(path))
    assert rebuilt.num_classes == 10 and rebuilt.img_size == (32, 32)
    _assert_state_equal(rebuilt, ema.state_dict())
    assert read_checkpoint(path).class_names == [str(i) for i in range(10)]
    load_checkpoint(rebuilt, path, use_ema=False)
    _assert_state_equal(rebuilt, model.state_dict())
    _assert_state_equal(t2tvit.create_model(None, checkpoint_path=str(path)), ema.state_dict())

    no_ema = _train_checkpoint(tmp_path / 'no_ema.pth', model, None, 't2t_vit_7_32',
                               {'img_size': 32, 'num_classes': 10}, [])
    _assert_state_equal(t2tvit.create_model('t2t_vit_7_32', checkpoint_path=str(no_ema)), model.state_dict())


def test_training_checkpoint_of_another_model_name_is_refused(demo_run):
    with pytest.raises(UserError, match='holds a t2t_vit_7_32 model, not t2t_vit_7'):
        t2tvit.create_model('t2t_vit_7', checkpoint_path=str(demo_run[0]))


def test_own_format_recreates_the_model_from_the_file_alone(tmp_path):
    torch.manual_seed(0)
    model = t2tvit.create_model('t2t_vit_7_32', num_classes=5, depth=2).eval()
    path = save_model(model, tmp_path / 'digits.safetensors', class_names=list('abcde'))
    rebuilt = t2tvit.create_model_from_checkpoint(path).eval()
    assert len(rebuilt.blocks) == 2 and rebuilt.num_classes == 5
    assert read_checkpoint(path).class_names == list('abcde')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert not [p for p in os.listdir(tmp_path) if p.startswith('.tmp')]


def test_atomic_save_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / 'sub' / 'last.pth'
    atomic_save({'step': 1}, path)
    atomic_save({'step': 2}, path)
    assert torch.load(path, weights_only=True) == {'step': 2}
    assert os.listdir(path.parent) == ['last.pth']


# -- adapting to the model ------------------------------------------------------------------------
def test_other_num_classes_reinitialises_the_head_and_says_so(demo_run, caplog):
    _, _, ema = demo_run
    with caplog.at_level(logging.WARNING, logger='t2tvit.checkpoint'):
        model = t2tvit.create_model('t2t_vit_7_32', checkpoint_path=str(demo_run[0]), num_classes=3)
    assert 're-initialised' in caplog.text and '10 classes' in caplog.text
    assert model.head.weight.shape == (3, 256)
    expected = {k: v for k, v in ema.state_dict().items() if not k.startswith('head.')}
    got = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_finetuning_tells_the_new_head_at_info_and_leaves_the_loggers_alone(demo_run, caplog):
    from t2tvit.checkpoint import read_checkpoint
    from t2tvit.engine import builders

    logger = logging.getLogger('t2tvit.checkpoint')
    before = logger.level
    with caplog.at_level(logging.INFO, logger='t2tvit.checkpoint'):
        level = logger.level
        model, kwargs = builders.finetune_model('t2t_vit_7_32', read_checkpoint(demo_run[0]),
                                                {'num_classes': 3}, {'drop_path_rate': 0.1})
        assert logger.level == level  # nothing muted the logger while the weights loaded
    heads = [r for r in caplog.records if 're-initialised' in r.getMessage()]
    assert [r.levelno for r in heads] == [logging.INFO]  # expected when fine-tuning: said, not warned
    assert logger.level == before
    assert model.head.weight.shape == (3, 256) and kwargs == {'img_size': 32, 'num_classes': 3}
    assert torch.equal(model.blocks[0].attn.qkv.weight, demo_run[2].blocks[0].attn.qkv.weight)


def test_checkpoint_code_imports_neither_the_factory_nor_the_models():
    """Reading a checkpoint sits below the models and the factory: no import cycle, hidden or not."""
    import ast
    from pathlib import Path

    import t2tvit.checkpoint

    for path in Path(t2tvit.checkpoint.__file__).parent.glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert (node.module or '').split('.')[0] not in ('factory', 'models', 'engine'), path.name


def test_checkpoint_of_another_architecture_names_the_model_it_fits(reference7, caplog):
    model = t2tvit.create_model('t2t_vit_10', num_classes=10)
    with caplog.at_level(logging.INFO, logger='t2tvit.checkpoint'), pytest.raises(UserError) as info:
        load_checkpoint(model, reference7)
    message = str(info.value)
    assert 'does not fit t2t_vit_10' in message and 'looks like a t2t_vit_7 checkpoint' in message
    assert 'missing: blocks.7' in message and '\n' not in message
    assert 're-initialised' not in caplog.text  # no head message for a load that fails


@pytest.fixture(scope='module')
def source32():
    """A t2t_vit_7_32 (8x8 grid) state dict whose position table is no sinusoid (as after training)."""
    torch.manual_seed(1)
    sd = t2tvit.create_model('t2t_vit_7_32', num_classes=10).state_dict()
    sd['pos_embed'] = sd['pos_embed'] + 0.1 * torch.randn_like(sd['pos_embed'])
    return sd


def test_position_table_is_resized_bicubically_for_another_image_size(source32, tmp_path):
    path = tmp_path / 'plain.pth'
    torch.save(source32, path)
    model = t2tvit.create_model('t2t_vit_7_32', checkpoint_path=str(path), img_size=64)
    assert model.grid_size == (16, 16)
    table = source32['pos_embed']
    grid = table[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 16), mode='bicubic', align_corners=False)
    expected = torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1)
    torch.testing.assert_close(model.pos_embed.data, expected, atol=1e-6, rtol=0)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source32['blocks.0.attn.qkv.weight'])


def test_position_table_is_regenerated_as_sinusoid_when_asked(source32, tmp_path):
    path = tmp_path / 'plain.pth'
    torch.save(source32, path)
    model = t2tvit.create_model('t2t_vit_7_32', checkpoint_path=str(path), img_size=48,
                                pos_embed_resize='sinusoid')
    assert model.grid_size == (12, 12)
    assert torch.equal(model.pos_embed.data, sinusoid_table(1 + 144, 256))


def test_image_size_comes_from_the_position_table_of_a_reference_checkpoint(tmp_path):
    model = t2tvit.create_model('t2t_vit_7_32', img_size=64, num_classes=10)
    path = tmp_path / 'at64.pth'
    torch.save({'state_dict': model.state_dict()}, path)
    rebuilt = t2tvit.create_model('t2t_vit_7_32', checkpoint_path=str(path))
    assert rebuilt.img_size == (64, 64)
    _assert_state_equal(rebuilt, model.state_dict())


# -- refused and unreadable files -----------------------------------------------------------------
class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    evil_torch = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'payload': _RunsShell(marker)}, evil_torch)
    evil_paddle = tmp_path / 'evil.pdparams'
    evil_paddle.write_bytes(pickle.dumps({'backbone.w': _RunsShell(marker)}, protocol=4))
    for path in (evil_torch, evil_paddle):
        with pytest.raises(UserError, match='refused, loading it would run code') as info:
            read_checkpoint(path)
        assert 'system' in str(info.value) and '\n' not in str(info.value)
        with pytest.raises(UserError):
            t2tvit.create_model('t2t_vit_7', checkpoint_path=str(path))
    assert not marker.exists()


def _bad_files(tmp_path, reference7, fixtures_dir):
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(reference7.read_bytes()[:100_000])
    half_paddle = tmp_path / 'half.pdparams'
    half_paddle.write_bytes((fixtures_dir / 'passl_t2t_vit_7.pdparams').read_bytes()[:5000])
    text = tmp_path / 'notes.txt'
    text.write_text('not weights\n')
    listing = tmp_path / 'list.pth'
    torch.save([torch.zeros(1)], listing)
    metrics = tmp_path / 'metrics.pth'
    torch.save({'top1': 81.5, 'epoch': 3}, metrics)
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    return {
        tmp_path / 'missing.pth': 'no such checkpoint file',
        tmp_path: 'is a folder',
        truncated: 'truncated or corrupt',
        half_paddle: 'truncated or corrupt',
        text: 'not a checkpoint file',
        listing: 'holds a list',
        metrics: 'not a model checkpoint',
        empty: 'empty',
    }


def test_bad_files_fail_with_one_line_naming_the_problem(tmp_path, reference7, fixtures_dir):
    for path, problem in _bad_files(tmp_path, reference7, fixtures_dir).items():
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        message = str(info.value)
        assert problem in message and str(path) in message and '\n' not in message, message


# -- convert --------------------------------------------------------------------------------------
def test_convert_to_reference_writes_what_the_reference_code_loads(reference7, weights7, spec7, tmp_path, capsys):
    out = tmp_path / 'for_reference.pth.tar'
    assert main(['convert', '--to', 'reference', str(reference7), str(out)]) == 0
    assert 'state_dict_ema' in capsys.readouterr().out
    saved = torch.load(out, map_location='cpu', weights_only=True)
    ema, raw = weights7
    fresh = t2tvit.create_model('t2t_vit_7')
    for key, expected in (('state_dict', raw), ('state_dict_ema', ema)):
        assert [[k, list(v.shape)] for k, v in saved[key].items()] == spec7['keys']
        fresh.load_state_dict(saved[key], strict=True)
        _assert_state_equal(fresh, expected)


def test_convert_passl_to_reference_and_to_t2tvit(passl7, tmp_path):
    pdparams, loaded = passl7[0], passl7[1].state_dict()
    out = tmp_path / 'passl.pth.tar'
    assert main(['convert', '--to', 'reference', '--model', 't2t_vit_7', pdparams, str(out)]) == 0
    saved = torch.load(out, map_location='cpu', weights_only=True)
    assert 'state_dict_ema' not in saved
    fresh = t2tvit.create_model('t2t_vit_7')
    fresh.load_state_dict(saved['state_dict'], strict=True)
    _assert_state_equal(fresh, loaded)

    ours = tmp_path / 'passl.safetensors'
    assert main(['convert', '--to', 't2tvit', '--model', 't2t_vit_7', pdparams, str(ours)]) == 0
    _assert_state_equal(t2tvit.create_model_from_checkpoint(ours), loaded)


def test_convert_training_checkpoint_to_t2tvit_needs_no_model_name(demo_run, tmp_path):
    _, _, ema = demo_run
    out = tmp_path / 'best.safetensors'
    assert main(['convert', '--to', 't2tvit', str(demo_run[0]), str(out)]) == 0
    rebuilt = t2tvit.create_model_from_checkpoint(out)
    assert rebuilt.num_classes == 10
    _assert_state_equal(rebuilt, ema.state_dict())
    done = convert_checkpoint(demo_run[0], tmp_path / 'raw.safetensors', to='t2tvit', use_ema=False)
    assert done['weights'] == 'weights'


def test_convert_without_a_model_name_asks_for_one(spec7, official_ckpt, tmp_path, capsys):
    plain = tmp_path / 'plain.pth'
    official_ckpt.write_checkpoint(spec7, str(plain), layout='plain')
    assert main(['convert', '--to', 't2tvit', str(plain), str(tmp_path / 'out.safetensors')]) == 2
    err = capsys.readouterr().err
    assert '--model' in err and 't2t_vit_7' in err and len(err.strip().splitlines()) == 1


def test_convert_command_exit_status_for_a_bad_path(tmp_path):
    env = {**os.environ, 'PYTHONPATH': str(ROOT / 'src')}
    proc = subprocess.run([sys.executable, '-m', 't2tvit', 'convert', '--to', 'reference',
                           str(tmp_path / 'missing.pth.tar'), str(tmp_path / 'out.pth.tar')],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and 'Traceback' not in proc.stderr
    assert 'no such checkpoint file' in proc.stderr
    assert not (tmp_path / 'out.pth.tar').exists()


def test_spec_list_covers_the_fifteen_reference_models(fixtures_dir):
    assert len(SPECS) == 15, SPECS


@pytest.mark.parametrize('name', ['t2t_vit_c_14', 'vit_dn', 't2t_vit_7'])
def test_rgb_weights_load_into_a_gray_model(name, tmp_path):
    # convolutional stems (t2t_vit_c_14, the ViT patch embedding) and the Performer soft split alike
    torch.manual_seed(0)
    rgb = t2tvit.create_model(name, img_size=64).eval()
    path = tmp_path / 'rgb.pth'
    torch.save(rgb.state_dict(), path)
    gray = t2tvit.create_model(name, img_size=64, in_chans=1, checkpoint_path=str(path)).eval()
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)
