"""Inference precision in the commands users run (`predict`, `validate`; `serve` in test_serve.py): --dtype
bf16/int8, --cast-weights and --fused-stem give float32's numbers where they should (the fused stem within
parity) and float32's top-1 in low precision, measured by the commands themselves; mistakes are one-line errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from t2tvit.cli import main

COUNT = 16


@pytest.fixture(scope='module')
def t2t_vit_14(tmp_path_factory, fixtures_dir, official_ckpt) -> Path:
    """The fixtures' T2T-ViT-14 in the reference release's plain layout (real logit scales)."""
    from conftest import load_json
    spec = load_json(fixtures_dir / 't2t_vit_14.spec.json')
    return official_ckpt.write_checkpoint(spec, tmp_path_factory.mktemp('ckpt') / 't2t_vit_14.pth', layout='plain')


@pytest.fixture(scope='module')
def digit_files(tmp_path_factory) -> list:
    """scikit-learn's handwritten digits as 64 px RGB PNG files (predict resizes and crops them to 224)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    folder = tmp_path_factory.mktemp('digits')
    paths = []
    for i, pixels in enumerate(load_digits().images[:COUNT]):
        path = folder / f'digit_{i:02d}.png'
        Image.fromarray((pixels * 15).astype(np.uint8)).convert('RGB').resize((64, 64), Image.BILINEAR).save(path)
        paths.append(str(path))
    return paths


def _predict(capsys, checkpoint, files, *flags) -> list:
    capsys.readouterr()
    assert main(['predict', *files, '--model', 't2t_vit_14', '--checkpoint', str(checkpoint), '--json', *flags]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope='module')
def float32_answers(t2t_vit_14, digit_files) -> list:
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(['predict', *digit_files, '--model', 't2t_vit_14', '--checkpoint', str(t2t_vit_14), '--json']) == 0
    return json.loads(out.getvalue())


def _top1(answers) -> list:
    return [a['top'][0]['index'] for a in answers]


@pytest.mark.parametrize('flags', [['-b', '5'], ['--fused-stem', '-b', '7']])
def test_predict_batches_and_fused_stem_give_float32s_probabilities(flags, float32_answers, t2t_vit_14, digit_files,
                                                                    capsys):
    answers = _predict(capsys, t2t_vit_14, digit_files, *flags)
    assert [a['image'] for a in answers] == digit_files  # every file once, in order, across uneven batches
    assert _top1(answers) == _top1(float32_answers)
    for a, b in zip(answers, float32_answers):
        # probabilities of 1000 classes are ~1e-3 here: 1e-6 is the logits' 1e-4 parity
        np.testing.assert_allclose([t['prob'] for t in a['top']], [t['prob'] for t in b['top']], atol=1e-6)


@pytest.mark.parametrize('flags', [['--dtype', 'bf16'], ['--dtype', 'bf16', '--cast-weights', '--fused-stem'],
                                   ['--dtype', 'int8']])
def test_predict_in_low_precision_keeps_the_float32_top1(flags, float32_answers, t2t_vit_14, digit_files, capsys):
    answers = _predict(capsys, t2t_vit_14, digit_files, *flags)
    same = sum(a == b for a, b in zip(_top1(answers), _top1(float32_answers)))
    assert same >= COUNT - 1, f'{flags}: top-1 of float32 on {same} of {COUNT} digits'
    for a, b in zip(answers, float32_answers):
        assert a['top'][0]['prob'] == pytest.approx(b['top'][0]['prob'], rel=0.2)


def test_predict_compiled_gives_the_eager_probabilities(small, digit_files, capsys):
    # -b 5 over 16 files: batches of 5 and then 1, a second compiled shape
    eager = _predict_small(capsys, small, digit_files)
    compiled = _predict_small(capsys, small, digit_files, '--compile', '-b', '5')
    assert [a['top'][0]['index'] for a in compiled] == [a['top'][0]['index'] for a in eager]
    for a, b in zip(compiled, eager):
        np.testing.assert_allclose([t['prob'] for t in a['top']], [t['prob'] for t in b['top']], atol=1e-5)


def _predict_small(capsys, checkpoint, files, *flags) -> list:
    capsys.readouterr()
    assert main(['predict', *files, '--checkpoint', str(checkpoint), '--json', '--topk', '10', *flags]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope='module')
def labelled_by_float32(tmp_path_factory, digit_files, float32_answers) -> Path:
    """DATA/val/<ImageNet wnid>/: each digit filed under float32's top-1 class, so float32 scores 100% and
    another precision scores its top-1 agreement with float32."""
    import shutil

    from timm.data import ImageNetInfo
    wnids = ImageNetInfo().label_names()
    root = tmp_path_factory.mktemp('labelled')
    for path, answer in zip(digit_files, float32_answers):
        folder = root / 'val' / wnids[answer['top'][0]['index']]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder)
    return root


def _validate(capsys, checkpoint, data, *flags) -> dict:
    capsys.readouterr()
    assert main(['validate', str(data), '--model', 't2t_vit_14', '--checkpoint', str(checkpoint), '-j', '0',
                 '--no-progress', '--json', *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_validate_measures_the_precision_it_is_given(t2t_vit_14, labelled_by_float32, capsys):
    fp32 = _validate(capsys, t2t_vit_14, labelled_by_float32)
    assert fp32['top1'] == 100.0 and fp32['images'] == COUNT
    fused = _validate(capsys, t2t_vit_14, labelled_by_float32, '--fused-stem')
    assert fused['top1'] == 100.0 and fused['loss'] == pytest.approx(fp32['loss'], rel=1e-5)
    for flags in (['--dtype', 'int8'], ['--dtype', 'bf16', '--cast-weights', '--fused-stem']):
        low = _validate(capsys, t2t_vit_14, labelled_by_float32, *flags)
        assert low['top1'] >= 100.0 * (COUNT - 1) / COUNT, flags
        assert low['loss'] == pytest.approx(fp32['loss'], rel=1e-2) and low['loss'] != fp32['loss'], flags
    assert main(['validate', str(labelled_by_float32), '--model', 't2t_vit_14', '--checkpoint', str(t2t_vit_14),
                 '-j', '0', '--no-progress', '--dtype', 'int8']) == 0
    assert ', int8, ' in capsys.readouterr().out  # the report says how it ran


@pytest.fixture(scope='module')
def small(tmp_path_factory) -> Path:
    from serve_helpers import save_small_model
    return save_small_model(tmp_path_factory.mktemp('small') / 'digits.safetensors')


@pytest.fixture(scope='module')
def no_soft_split(tmp_path_factory) -> Path:
    """A convolutional-T2T model (T2T-ViT-c, nothing to fuse), made small."""
    import t2tvit
    from t2tvit.checkpoint import save_model
    model = t2tvit.create_model('t2t_vit_c_14', img_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    return Path(save_model(model, tmp_path_factory.mktemp('conv') / 'conv.safetensors'))


@pytest.mark.parametrize('flags,says', [
    (['--cast-weights'], '--cast-weights casts the weights for bf16/fp16'),
    (['--dtype', 'int8', '--compile-stem'], 'drop them with --dtype int8'),
    (['-b', '0'], '--batch-size must be at least 1'),
    (['--compile', '--compile-stem'], 'drop --compile-stem'),
    (['--dtype', 'int8', '--compile'], 'drop them with --dtype int8'),
])
def test_predict_precision_mistakes_are_one_line_errors(flags, says, small, digit_files, capsys):
    assert main(['predict', digit_files[0], '--checkpoint', str(small), *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and 'Traceback' not in err


def test_fused_stem_of_a_model_without_soft_splits_is_a_user_error(no_soft_split, digit_files, capsys):
    assert main(['predict', digit_files[0], '--checkpoint', str(no_soft_split), '--fused-stem']) == 2
    assert 'no soft split to fuse' in capsys.readouterr().err
    assert main(['predict', digit_files[0], '--checkpoint', str(no_soft_split), '--compile-stem']) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message on a machine without a GPU')
def test_int8_on_a_gpu_and_amp_with_dtype_are_user_errors(small, digit_files, capsys):
    assert main(['predict', digit_files[0], '--checkpoint', str(small), '--dtype', 'int8', '--device', 'cuda']) == 2
    assert 'error:' in capsys.readouterr().err
    assert main(['validate', '--checkpoint', str(small), '--amp', '--dtype', 'bf16']) == 2
    assert '--amp picks autocast by itself' in capsys.readouterr().err


@pytest.mark.parametrize('argv', [
    ['predict', '{image}', '--checkpoint', '{ckpt}', '--compile'],
    ['predict', '{image}', '--checkpoint', '{ckpt}', '--compile-stem'],
    ['benchmark', '--model', 't2t_vit_7', '--mode', 'train', '--compile', '--steps', '1'],
])
def test_compiling_without_a_cxx_compiler_is_a_user_error(argv, small, digit_files, tmp_path):
    """inductor builds the CPU kernels with g++: on a machine without one, the command says so in one line
    before it compiles, instead of a traceback from the first batch."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != 'CXX'}
    env['PATH'] = str(tmp_path)  # an empty folder: no g++, no c++
    argv = [a.format(image=digit_files[0], ckpt=small) for a in argv]
    done = subprocess.run([sys.executable, '-m', 't2tvit', *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    flag = '--compile-stem' if '--compile-stem' in argv else '--compile'
    assert done.stderr.strip().splitlines() == [
        f't2tvit {argv[0]}: error: {flag} builds C++ kernels for the CPU and found no C++ compiler: install g++ '
        f'(apt-get install g++) or set CXX, or drop {flag}']


@pytest.mark.skipif(torch.cuda.is_available(), reason='the notice is about a machine without a GPU')
def test_compiling_on_a_cpu_only_machine_prints_no_cuda_notice(small, digit_files, tmp_path):
    """torch built with CUDA logs "No CUDA runtime is found, using CUDA_HOME=..." while inductor builds CPU
    kernels on a machine without a GPU (CUDA_HOME set to a folder that exists forces the case); the command's
    stderr stays free of it."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, CUDA_HOME=str(tmp_path))
    done = subprocess.run([sys.executable, '-m', 't2tvit', 'predict', digit_files[0], '--checkpoint', str(small),
                           '--compile'], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert 'No CUDA runtime' not in done.stderr, done.stderr


def test_predict_takes_a_folder_of_images(small, digit_files, tmp_path, capsys):
    """A folder stands for every image file under it, subfolders included, sorted (other files skipped); one
    without images is a one-line error."""
    import shutil
    folder = tmp_path / 'photos'
    (folder / 'more').mkdir(parents=True)
    copies = [str(shutil.copy(f, folder / ('more' if i % 2 else '') / Path(f).name)) for i, f in
              enumerate(digit_files)]
    (folder / 'notes.txt').write_text('not an image')
    listed = _predict_small(capsys, small, copies)
    from_folder = _predict_small(capsys, small, [str(folder)])
    assert [a['image'] for a in from_folder] == sorted(copies)
    assert from_folder == sorted(listed, key=lambda a: a['image'])
    (tmp_path / 'empty').mkdir()
    assert main(['predict', str(tmp_path / 'empty'), '--checkpoint', str(small)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'a folder with no image files in it' in err[0]
