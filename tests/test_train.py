"""train / validate / finetune / predict end to end, exact resume, SIGTERM, distillation, presets."""

import csv
import json
import math
import signal
import time
from pathlib import Path

import pytest
import torch

from t2tvit.cli import main
from t2tvit.engine.config import shipped_presets
from train_helpers import (
    QUICK,
    TINY,
    assert_same_tensors,
    load,
    run_cli,
    run_cli_signalled_at_step,
    subprocess_env,
    write_folder,
)


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp('data') / 'shapes')


@pytest.fixture(scope='module')
def trained(folder, tmp_path_factory):
    """A finished two-epoch run on the tiny folder (EMA on, mixup and RandAugment on)."""
    out = tmp_path_factory.mktemp('runs') / 'shapes'
    code = main(
        [
            'train', str(folder), *TINY, *QUICK, '--epochs', '2', '-b', '4', '--lr', '1e-3', '--output', str(out),
            '--model-ema-decay', '0.9'
        ]
    )
    assert code == 0
    return out


def _rows(out: Path):
    with open(out / 'metrics.csv', newline='') as f:
        return list(csv.DictReader(f))


def test_train_writes_checkpoints_metrics_config_and_curves(trained, folder):
    for name in ('config.yaml', 'last.pth', 'best.pth', 'metrics.csv', 'curves.png'):
        assert (trained / name).is_file(), name
    rows = _rows(trained)
    assert [int(r['epoch']) for r in rows] == [1, 2]
    for r in rows:
        for col in ('lr', 'train_loss', 'val_loss', 'top1', 'top5', 'img_per_s', 'time', 'ema_top1'):
            assert math.isfinite(float(r[col])), col
        assert 0 <= float(r['top1']) <= float(r['top5']) <= 100
    ckpt = load(trained / 'last.pth')  # weights_only=True: plain values and tensors only
    assert ckpt['format'] == 't2tvit-train' and ckpt['version'] == 1
    assert ckpt['epoch'] == 2 and ckpt['step'] == 2 * (24 // 4)
    assert ckpt['class_names'] == ['circle', 'square', 'stripes']
    assert ckpt['config']['model'] == 't2t_vit_7_32'
    assert (
        ckpt['config']['model_kwargs']['num_classes'] == 3
        and ckpt['config']['model_kwargs']['img_size'] == 32
    )
    assert ckpt['ema'] is not None and set(ckpt['ema']) == set(ckpt['model'])
    for key in ('optimizer', 'scheduler', 'rng'):
        assert ckpt[key]
    import yaml

    saved = yaml.safe_load((trained / 'config.yaml').read_text())
    assert saved['data'] == str(folder) and saved['epochs'] == 2 and saved['batch_size'] == 4


def test_checkpoint_loads_with_create_model(trained):
    import t2tvit

    ckpt = load(trained / 'best.pth')
    model = t2tvit.create_model(
        't2t_vit_7_32', checkpoint_path=str(trained / 'best.pth'), **ckpt['config']['model_kwargs']
    ).eval()
    assert model.head.out_features == 3
    for k, v in ckpt['ema'].items():  # EMA weights by default
        assert torch.equal(model.state_dict()[k], v), k


def test_validate_reproduces_the_training_evaluation(trained, folder, capsys):
    capsys.readouterr()
    assert (
        main(
            ['validate', str(folder), '--checkpoint', str(trained / 'best.pth'), '--json', '--no-progress', '-j', '0']
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {'top1', 'top5', 'loss', 'images', 'img_per_s'}
    assert result['images'] == 12
    best = max(_rows(trained), key=lambda r: float(r['ema_top1']))
    assert result['top1'] == pytest.approx(float(best['ema_top1']), abs=1e-3)
    assert result['loss'] == pytest.approx(float(best['ema_val_loss']), rel=1e-4)


def test_predict_names_the_classes_of_the_checkpoint(trained, folder, capsys, tmp_path):
    gray = tmp_path / 'gray.png'
    from PIL import Image

    Image.open(next((folder / 'val' / 'circle').glob('*.png'))).convert('L').save(gray)
    rgba = tmp_path / 'rgba.png'
    Image.open(next((folder / 'val' / 'square').glob('*.png'))).convert('RGBA').save(rgba)
    capsys.readouterr()
    assert (
        main(
            ['predict', str(gray), str(rgba), '--checkpoint', str(trained / 'best.pth'), '--topk', '3', '--json']
        )
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    assert [r['image'] for r in results] == [str(gray), str(rgba)]
    for r in results:
        assert sorted(t['class'] for t in r['top']) == ['circle', 'square', 'stripes']
        probs = [t['prob'] for t in r['top']]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_finetune_keeps_the_backbone_and_sizes_a_new_head(trained, tmp_path):
    data = write_folder(tmp_path / 'two', classes=('cross', 'stripes'), train=6, val=2, size=48, seed=1)
    out = tmp_path / 'ft'
    # backbone lr = lr x 0 keeps the pretrained weights exactly: they must be the source's
    code = main(
        [
            'finetune', str(data), '--checkpoint', str(trained / 'best.pth'), *TINY, *QUICK, '--img-size', '48',
            '--epochs', '1', '-b', '4', '--transfer-ratio', '0', '--output', str(out)
        ]
    )
    assert code == 0
    src, ft = load(trained / 'best.pth'), load(out / 'last.pth')
    assert ft['config']['model_kwargs']['img_size'] == 48 and ft['class_names'] == ['cross', 'stripes']
    assert ft['config']['opt'] == 'momentum' and ft['config']['lr'] == 0.05  # the reference transfer recipe
    assert ft['model']['head.weight'].shape == (2, 32)
    assert ft['model']['pos_embed'].shape == (1, 1 + 12 * 12, 32)  # 48 px: a 12x12 token grid
    assert torch.equal(ft['model']['blocks.0.attn.qkv.weight'], src['ema']['blocks.0.attn.qkv.weight'])
    assert torch.equal(
        ft['model']['tokens_to_token.project.weight'], src['ema']['tokens_to_token.project.weight']
    )


def test_train_and_validate_on_builtin_digits(tmp_path, capsys):
    out = tmp_path / 'digits'
    # no DATA: the built-in digits, upsampled to the model's 32x32
    assert (
        main(
            [
                'train', *TINY, *QUICK, '--epochs', '1', '-b', '64', '--lr', '2e-3', '--mixup', '0', '--cutmix', '0',
                '--augment', 'none', '--no-model-ema', '--output', str(out)
            ]
        )
        == 0
    )
    row = _rows(out)[0]
    ckpt = load(out / 'last.pth')
    assert ckpt['class_names'] == [str(d) for d in range(10)] and ckpt['step'] == 1437 // 64
    capsys.readouterr()
    # no DATA again: validate on the data the checkpoint was trained on (360 held-out digits)
    assert (
        main(['validate', '--checkpoint', str(out / 'last.pth'), '--json', '--no-progress', '-j', '0']) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result['images'] == 360
    assert result['top1'] == pytest.approx(float(row['top1']), abs=1e-3)


def _resume_args(folder, out):
    # everything random on: RandAugment, erasing, mixup/cutmix, drop-path, the Performer's dropout, EMA
    return [
        'train', str(folder), *TINY, *QUICK, '--epochs', '3', '-b', '4', '--lr', '1e-3', '--drop-path', '0.1',
        '--output', str(out), '--model-ema-decay', '0.9'
    ]


def _next_second():
    """Wait for the wall clock's next second. TensorBoard reads a folder's event files in name order,
    ``events.out.tfevents.<seconds>.<host>.<pid>.<writer count>``: a real resume is a new process in a
    later second, but runs resumed within one second in one process sort by the count as text
    (``.10`` before ``.9``), and the reader then drops the earlier epochs' points."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def test_resume_after_an_epoch_is_bit_identical(folder, tmp_path):
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    assert main(_resume_args(folder, straight)) == 0
    assert main(_resume_args(folder, split) + ['--stop-after-epochs', '1']) == 0
    assert load(split / 'last.pth')['epoch'] == 1
    _next_second()
    assert main(_resume_args(folder, split) + ['--stop-after-epochs', '1', '--resume', 'auto']) == 0
    assert load(split / 'last.pth')['epoch'] == 2
    _next_second()
    assert main(_resume_args(folder, split) + ['--resume', 'auto']) == 0
    a, b = load(straight / 'last.pth'), load(split / 'last.pth')
    for key in ('model', 'ema', 'optimizer', 'scheduler', 'epoch', 'step', 'rng'):
        assert_same_tensors(a[key], b[key], where=key)
    ra, rb = _rows(straight), _rows(split)
    assert [(r['epoch'], r['train_loss'], r['top1'], r['ema_top1']) for r in ra] == [
        (r['epoch'], r['train_loss'], r['top1'], r['ema_top1']) for r in rb
    ]
    # TensorBoard (a dev dependency): one point per epoch across the resumes, the values of metrics.csv
    for out in (straight, split):
        assert _tensorboard_scalars(out, 'train_loss') == [(int(r['epoch']), float(r['train_loss'])) for r in rb]


def _tensorboard_scalars(out, tag):
    pytest.importorskip('tensorboard', reason='tensorboard is not installed (pip install -e .[dev])')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / 'tensorboard'))
    events.Reload()
    return [(e.step, pytest.approx(e.value, rel=1e-5)) for e in events.Scalars(tag)]


@pytest.mark.parametrize('flags, key, value', [(['--grad-checkpointing'], 'grad_checkpointing', True),
                                               (['--activations', 'plain'], 'activations', 'plain')])
def test_memory_options_train_the_same_weights(folder, tmp_path, flags, key, value):
    # the default keeps LayerNorm/GELU inputs (lean); checkpointing and plain autograd saving must agree bit for bit
    default, other = tmp_path / 'default', tmp_path / 'other'
    assert main(_resume_args(folder, default) + ['--epochs', '1']) == 0
    assert main(_resume_args(folder, other) + ['--epochs', '1', *flags]) == 0
    a, b = load(default / 'last.pth'), load(other / 'last.pth')
    for part in ('model', 'ema', 'optimizer'):
        assert_same_tensors(a[part], b[part], where=part)
    assert a['config']['activations'] == 'lean' and b['config'][key] == value


def test_sigterm_mid_epoch_saves_and_resume_matches(tmp_path):
    """SIGTERM: last.pth at the end of the current step, exit 143, a resume line; the resumed run is exact."""
    folder = write_folder(tmp_path / 'data', train=40, val=2)  # 60 steps of batch 2 per epoch
    args = ['train', str(folder), *TINY, *QUICK, '--epochs', '2', '-b', '2', '--lr', '1e-3', '--augment', 'timm',
            '--model-ema-decay', '0.9']
    ref = run_cli([*args, '--output', str(tmp_path / 'ref')], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / 'run'
    stopped = run_cli_signalled_at_step(5, signal.SIGTERM, [*args, '--output', str(out)], cwd=tmp_path)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert 'Traceback' not in stopped.stderr
    assert 'interrupted by SIGTERM in epoch 1 after 5 batches' in stopped.stderr, stopped.stderr[-2000:]
    assert 'resume with:' in stopped.stderr and '--resume auto' in stopped.stderr
    ckpt = load(out / 'last.pth')
    assert ckpt['epoch'] == 0 and ckpt['step'] == 5 and ckpt['progress']['batches_done'] == 5  # the signal's step

    resumed = run_cli([*args, '--output', str(out), '--resume', 'auto'], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load(tmp_path / 'ref' / 'last.pth'), load(out / 'last.pth')
    for key in ('model', 'ema', 'optimizer', 'step', 'epoch'):
        assert_same_tensors(a[key], b[key], where=key)


def test_soft_and_hard_distillation_train(trained, folder, tmp_path):
    import timm

    teacher = timm.create_model('resnet10t', num_classes=3)
    torch.save(teacher.state_dict(), tmp_path / 'resnet.pth')
    runs = {
        'soft': [
            '--teacher', 't2t_vit_7_32', '--teacher-checkpoint', str(trained / 'best.pth'), '--distill', 'soft',
            '--distill-tau', '2'
        ],
        'hard': ['--teacher', 'resnet10t', '--teacher-checkpoint', str(tmp_path / 'resnet.pth'), '--distill', 'hard'],
    }
    for mode, extra in runs.items():
        out = tmp_path / mode
        assert (
            main(
                ['train', str(folder), *TINY, *QUICK, '--epochs', '1', '-b', '4', '--output', str(out), *extra]
            )
            == 0
        ), mode
        ckpt = load(out / 'last.pth')
        assert ckpt['config']['distill'] == mode
        assert math.isfinite(float(_rows(out)[0]['train_loss']))


def test_distillation_loss_terms():
    from t2tvit.engine.builders import DistillationLoss

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    teacher = torch.nn.Identity()
    target = torch.tensor([1, 2])
    ce = torch.nn.CrossEntropyLoss()
    soft = DistillationLoss(ce, teacher, 'soft', alpha=1.0, tau=3.0)
    assert soft(logits, logits, target).item() == pytest.approx(0.0, abs=1e-6)  # student == teacher
    hard = DistillationLoss(ce, teacher, 'hard', alpha=1.0, tau=1.0)
    assert hard(logits, logits, target).item() == pytest.approx(ce(logits, logits.argmax(1)).item())
    half = DistillationLoss(ce, teacher, 'hard', alpha=0.5, tau=1.0)
    expected = 0.5 * ce(logits, target) + 0.5 * ce(logits, logits.argmax(1))
    assert half(logits, logits, target).item() == pytest.approx(expected.item())


def test_nonfinite_losses_stop_the_run_and_keep_the_last_good_checkpoint(
    folder, tmp_path, monkeypatch, capsys
):
    from t2tvit.engine import builders

    real = builders.build_train_loss
    calls = {'n': 0}

    def poisoned(cfg, mixup):
        base = real(cfg, mixup)

        def loss(outputs, targets):
            calls['n'] += 1
            value = base(outputs, targets)
            return value if calls['n'] <= 6 else value * float('nan')  # good for epoch 1 (6 steps), then NaN

        return loss

    monkeypatch.setattr(builders, 'build_train_loss', poisoned)
    out = tmp_path / 'nan'
    capsys.readouterr()
    code = main(['train', str(folder), *TINY, *QUICK, '--epochs', '6', '-b', '4', '--output', str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert 'not finite for 20 steps in a row' in err and '--lr' in err and 'Traceback' not in err
    ckpt = load(out / 'last.pth')
    assert ckpt['epoch'] == 1  # epochs 2-4 ended inside the NaN streak: never saved over the good state
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())


@pytest.mark.slow
def test_demo_reaches_97_percent_on_held_out_digits(tmp_path):
    """`make demo`: train, validate best.pth, predict; >= 97% held-out top-1 (minutes on 2 CPU cores)."""
    from train_helpers import run_cli

    # torch's default threads, as `make demo` runs (the float summation order follows the thread count)
    env = {k: v for k, v in subprocess_env().items() if k != 'OMP_NUM_THREADS'}
    result = run_cli(['demo', '--output', str(tmp_path / 'demo'), '--no-progress'], cwd=tmp_path, timeout=900,
                     env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith('t2t_vit_lite_32 '))
    top1 = float(line.split('top1 ')[1].split()[0])
    assert top1 >= 97.0, line
    assert (tmp_path / 'demo' / 'curves.png').is_file() and len(_rows(tmp_path / 'demo')) == 40
    predictions = [ln for ln in result.stdout.splitlines() if '_label_' in ln and ln.endswith('%')]
    assert len(predictions) == 8


@pytest.mark.parametrize('preset', sorted(shipped_presets()))
def test_every_preset_parses_and_builds_its_model(preset):
    import t2tvit
    from t2tvit.engine.config import build_config

    command = 'finetune' if preset.startswith('finetune') else 'train'
    cfg = build_config(command, preset, {'data': 'path/to/data'})
    assert cfg.model in t2tvit.list_models()
    kwargs = {**cfg.model_kwargs}
    if cfg.img_size:
        kwargs['img_size'] = cfg.img_size
    with torch.device('meta'):
        model = t2tvit.create_model(cfg.model, **kwargs)
    assert model.img_size == (cfg.img_size or model.img_size[0],) * 2
