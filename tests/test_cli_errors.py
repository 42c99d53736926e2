"""Bad input: one line on stderr, exit status 2, no traceback, nothing lost."""

import pytest
import torch

from t2tvit.cli import main
from train_helpers import QUICK, TINY, fails_in_one_line as _fails, load, run_cli, write_folder


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp('data') / 'shapes', train=4, val=2)


@pytest.fixture(scope='module')
def checkpoint(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('runs') / 'ok'
    assert main(['train', str(folder), *TINY, *QUICK, '--epochs', '1', '-b', '4', '--output', str(out)]) == 0
    return out / 'last.pth'


def test_missing_data(capsys, tmp_path):
    _fails(
        capsys, ['train', str(tmp_path / 'nope'), *TINY, '--output', str(tmp_path / 'o')], 'no such folder'
    )


def test_empty_data(capsys, tmp_path):
    (tmp_path / 'empty').mkdir()
    _fails(
        capsys,
        ['train', str(tmp_path / 'empty'), *TINY, '--output', str(tmp_path / 'o')],
        'no train folder',
        'train/<class>',
    )


def test_class_folder_without_images(capsys, tmp_path):
    root = write_folder(tmp_path / 'd', train=2, val=1)
    (root / 'train' / 'ghost').mkdir()
    _fails(
        capsys,
        ['train', str(root), *TINY, '--output', str(tmp_path / 'o')],
        'no images found in',
        'train/ghost',
    )


def test_more_than_one_percent_undecodable_aborts(capsys, tmp_path):
    root = write_folder(tmp_path / 'd', train=4, val=2)
    (root / 'train' / 'circle' / 'broken.png').write_bytes(b'not a png')
    # one batch of all 13 images: the broken one is always read
    _fails(
        capsys,
        [
            'train', str(root), *TINY, *QUICK, '-b', '13', '--mixup', '0', '--cutmix', '0', '--epochs', '1',
            '--output', str(tmp_path / 'o')
        ],
        'failed to decode',
        'broken.png',
    )


def test_a_few_undecodable_images_are_skipped_and_reported(capsys, tmp_path):
    root = write_folder(tmp_path / 'd', classes=('circle', 'square'), train=60, val=2, size=8)
    (root / 'train' / 'circle' / 'broken.png').write_bytes(b'not a png')  # 1 of 121: under 1%
    capsys.readouterr()
    code = main(
        [
            'train', str(root), *TINY, *QUICK, '-b', '11', '--epochs', '1', '--img-size', '32', '--mixup', '0',
            '--cutmix', '0', '--output', str(tmp_path / 'o')
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert 'skipped 1 training image(s) that failed to decode' in out and 'broken.png' in out


def test_unknown_model_suggests_the_closest(capsys, tmp_path):
    _fails(
        capsys,
        ['train', '--model', 't2t_vit_14x', '--output', str(tmp_path / 'o')],
        'unknown model',
        'did you mean',
        't2t_vit_14',
    )


def test_checkpoint_of_another_model(capsys, checkpoint, folder, tmp_path):
    _fails(
        capsys,
        ['validate', str(folder), '--model', 't2t_vit_7', '--checkpoint', str(checkpoint)],
        'holds a t2t_vit_7_32 model, not t2t_vit_7',
    )
    import timm

    torch.save(timm.create_model('resnet10t', num_classes=3).state_dict(), tmp_path / 'resnet.pth')
    _fails(
        capsys,
        ['validate', str(folder), '--model', 't2t_vit_7_32', '--checkpoint', str(tmp_path / 'resnet.pth')],
        'does not fit t2t_vit_7_32',
    )


def test_batch_larger_than_the_dataset(capsys, folder, tmp_path):
    _fails(
        capsys,
        ['train', str(folder), *TINY, '-b', '64', '--output', str(tmp_path / 'o')],
        'batch size 64',
        'larger than the training set (12 images)',
    )


def test_image_size_the_t2t_geometry_cannot_tile(capsys, folder, tmp_path):
    _fails(
        capsys,
        ['train', str(folder), *TINY, '--img-size', '30', '--output', str(tmp_path / 'o')],
        '--img-size 30',
        'multiple of 4',
    )


def test_output_holding_another_run_is_refused_and_kept(capsys, checkpoint, folder):
    out = checkpoint.parent
    before = load(checkpoint)['model']
    _fails(
        capsys,
        ['train', str(folder), *TINY, *QUICK, '-b', '4', '--epochs', '1', '--output', str(out)],
        'already holds a run',
        '--resume auto',
        '--overwrite',
    )
    for name in ('config.yaml', 'last.pth', 'metrics.csv'):
        assert (out / name).is_file()
    assert torch.equal(load(checkpoint)['model']['head.weight'], before['head.weight'])


def test_unknown_yaml_key(capsys, tmp_path):
    preset = tmp_path / 'p.yaml'
    preset.write_text('model: t2t_vit_7_32\nlearning_rate: 0.1\n')
    _fails(
        capsys,
        ['train', '--config', str(preset), '--output', str(tmp_path / 'o')],
        "unknown key 'learning_rate'",
    )
    preset.write_text('model: t2t_vit_7_32\nwight_decay: 0.1\n')
    _fails(
        capsys,
        ['train', '--config', str(preset), '--output', str(tmp_path / 'o')],
        "did you mean 'weight_decay'",
    )


def test_cifar_not_on_disk(capsys, tmp_path):
    _fails(
        capsys,
        ['train', str(tmp_path), '--dataset', 'cifar10', *TINY, '--output', str(tmp_path / 'o')],
        'cifar-10-batches-py',
        'nothing is downloaded',
    )


def test_resume_of_another_model_is_refused(capsys, checkpoint, folder, tmp_path):
    _fails(
        capsys,
        ['train', str(folder), '--model', 't2t_vit_7', '--resume', str(checkpoint), '--output', str(tmp_path / 'o')],
        'checkpoint is for model t2t_vit_7_32',
    )


def test_errors_from_the_console_have_no_traceback(tmp_path):
    result = run_cli(
        ['train', str(tmp_path / 'missing'), '--model', 't2t_vit_7_32'], cwd=tmp_path, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().count('\n') == 0 and 'no such folder' in result.stderr
    assert 'Traceback' not in result.stderr


def test_ctrl_c_outside_training_ends_in_one_line_and_status_130(checkpoint, monkeypatch, capsys):
    """Ctrl-C while predict runs (or a compiling server warms up): 'interrupted' and the shell's 130, no traceback
    (train and finetune have their own message, with the command that resumes)."""
    import importlib
    evaluate = importlib.import_module('t2tvit.engine.evaluate')  # the module (the package exports a function)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, 'predict_files', interrupted)
    capsys.readouterr()
    assert main(['predict', str(checkpoint), '--checkpoint', str(checkpoint)]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ['t2tvit predict: interrupted']
