"""A run does what was asked: --epochs N runs N epochs (warm-up and cool-down inside), the start line
says why the lr is what it is, the paper presets keep the reference's schedule epoch for epoch, small
data gets a warning, and finetune is the reference transfer recipe."""

import csv
import math

import pytest
import torch

from t2tvit.cli import main
from t2tvit.engine import builders
from t2tvit.engine.config import build_config, shipped_presets
from t2tvit.engine.train import small_data_note
from train_helpers import TINY, load, write_folder

# QUICK without its --warmup-epochs 0 --cooldown-epochs 0: the defaults (10 and 10) are the point here
FAST = ['--no-progress', '-j', '0']


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp('data') / 'shapes', train=4, val=2)


def _rows(out):
    with open(out / 'metrics.csv', newline='') as f:
        return list(csv.DictReader(f))


def _cosine(peak, low, t, length):
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * t / length))


@pytest.mark.parametrize('epochs, warmup, cooldown, expected', [
    (2, 10, 10, (0, 0)),      # the measured complaint: 2 epochs were all warm-up, plus 10 cool-down epochs
    (12, 10, 10, (2, 1)),
    (50, 10, 10, (10, 5)),
    (310, 10, 10, (10, 10)),  # the reference
    (40, 3, 0, (3, 0)),       # the demo preset
    (1, 10, 10, (0, 0)),
])
def test_warmup_is_at_most_a_fifth_and_cooldown_a_tenth_of_the_run(epochs, warmup, cooldown, expected):
    cfg = build_config('train', overrides={'model': 't2t_vit_7', 'epochs': epochs, 'warmup_epochs': warmup,
                                           'cooldown_epochs': cooldown})
    plan = builders.epoch_plan(cfg)
    assert (plan.epochs, plan.warmup, plan.cooldown) == (epochs, *expected)
    assert plan.warmup + plan.cooldown <= epochs
    capped = [n for n in plan.notes if 'capped' in n]
    assert len(capped) == (expected[0] < warmup) + (expected[1] < cooldown)


def _lr_per_epoch(cfg, scheduler, optimizer, epochs):
    lrs = []
    for epoch in range(epochs):
        scheduler.step(epoch)  # as fit() and the reference main.py: the lr of epoch e is set before it runs
        lrs.append(optimizer.param_groups[0]['lr'])
    return lrs


@pytest.mark.parametrize('preset', sorted(p for p in shipped_presets() if p.startswith('t2t_vit')))
def test_paper_presets_keep_the_reference_lr_at_every_epoch(preset):
    from timm.scheduler import create_scheduler_v2

    cfg = build_config('train', preset, {'data': 'path/to/data'})
    peak = builders.scaled_lr(cfg.lr, 8 * cfg.batch_size, cfg.lr_base_size)  # 8 processes x 64, as the reference
    assert peak == cfg.lr

    def optimizer():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)

    new_opt = optimizer()
    plan = builders.epoch_plan(cfg)
    ours = _lr_per_epoch(cfg, builders.build_scheduler(new_opt, cfg, 2502, plan), new_opt, plan.epochs)
    # before: 300 epochs asked for, timm adding its 10 cool-down epochs on top (the reference main.py's count)
    old_opt = optimizer()
    old, old_total = create_scheduler_v2(old_opt, sched='cosine', num_epochs=300, warmup_epochs=10, warmup_lr=1e-6,
                                         min_lr=1e-5, cooldown_epochs=10, updates_per_epoch=2502)
    assert plan.epochs == old_total == 310 and (plan.warmup, plan.cooldown) == (10, 10)
    assert ours == _lr_per_epoch(cfg, old, old_opt, old_total)
    # and what that is: a linear warm-up from 1e-6 over epochs 0-9, the cosine over 300 epochs (its first 10
    # hidden under the warm-up), then 10 epochs at min lr
    expected = [1e-6 + e * (peak - 1e-6) / 10 for e in range(10)]
    expected += [_cosine(peak, 1e-5, e, 300) for e in range(10, 300)] + [1e-5] * 10
    assert ours == pytest.approx(expected, rel=1e-12, abs=0)


def test_epochs_n_runs_n_epochs_with_warmup_and_cooldown_inside(folder, tmp_path, capsys):
    out = tmp_path / 'run'
    # defaults: 10 warm-up and 10 cool-down epochs asked for; 5 epochs allow 1 and 0 (before: 15 epochs ran)
    code = main(['train', str(folder), *TINY, *FAST, '--epochs', '5', '-b', '4', '--lr', '1e-3', '--lr-base-size',
                 '8', '--no-model-ema', '--output', str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    rows = _rows(out)
    assert [int(r['epoch']) for r in rows] == [1, 2, 3, 4, 5]
    assert load(out / 'last.pth')['epoch'] == 5
    start = printed.splitlines()[0]
    assert start.startswith('training t2t_vit_7_32'), start
    assert ('5 epochs (1 warm-up from 1e-06, cosine to 1e-05, 0 cool-down, --warmup-epochs 10 capped at '
            'a fifth of the run, --cooldown-epochs 10 capped at a tenth of the run)') in start, start
    assert 'peak lr 0.0005 = 0.001 x 4 / 8 (linear scaling, --lr-base-size 8)' in start, start
    assert 'rarely learns' not in printed  # a tiny model: no small-data warning
    expected = [1e-6] + [_cosine(5e-4, 1e-5, e, 5) for e in range(1, 5)]
    assert [float(r['lr']) for r in rows] == pytest.approx(expected, rel=1e-5)


def test_lr_without_scaling_is_explained(folder, tmp_path, capsys):
    code = main(['train', str(folder), *TINY, *FAST, '--epochs', '1', '-b', '4', '--lr', '2e-3', '--lr-base-size',
                 '0', '--no-model-ema', '--output', str(tmp_path / 'run')])
    assert code == 0
    start = capsys.readouterr().out.splitlines()[0]
    assert '1 epochs (0 warm-up, cosine to 1e-05, 0 cool-down' in start, start
    assert 'peak lr 0.002 (--lr as given, --lr-base-size 0)' in start, start


def test_small_data_note_thresholds():
    assert 't2tvit finetune DATA --model t2t_vit_7 --pretrained' in small_data_note(245, 4_300_000, 't2t_vit_7')
    assert small_data_note(245, 700_000, 't2t_vit_lite_32') is None  # the demo's model learns the digits
    assert small_data_note(50_000, 4_300_000, 't2t_vit_7') is None
    assert small_data_note(1_281_167, 64_000_000, 't2t_vit_24') is None


@pytest.fixture(scope='module')
def scratch(folder, tmp_path_factory):
    """t2t_vit_7_32 (4.3M parameters) trained from scratch for one epoch on 12 images: (output, printed)."""
    out = tmp_path_factory.mktemp('runs') / 'scratch'
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(['train', str(folder), '--model', 't2t_vit_7_32', *FAST, '--epochs', '1', '-b', '4',
                     '--no-model-ema', '--output', str(out)])
    assert code == 0
    return out, buf.getvalue()


def test_training_a_paper_model_from_scratch_on_little_data_warns_once(scratch):
    _, printed = scratch
    notes = [ln for ln in printed.splitlines() if 'rarely learns' in ln]
    assert len(notes) == 1, printed
    assert '12 images' in notes[0] and 't2tvit finetune DATA --model t2t_vit_7_32 --pretrained' in notes[0]


def test_finetune_is_the_reference_transfer_recipe(scratch, folder, tmp_path, capsys):
    """Plain momentum SGD, the T2T module and blocks at lr x 0.01, the head at lr, cls_token and the final
    norm left as loaded, fp32; no small-data warning (the weights are pretrained)."""
    source, _ = scratch
    out = tmp_path / 'ft'
    data = write_folder(tmp_path / 'two', classes=('cross', 'stripes'), train=4, val=2, seed=1)
    code = main(['finetune', str(data), '--checkpoint', str(source / 'last.pth'), '--model', 't2t_vit_7_32',
                 *FAST, '--img-size', '32', '--epochs', '1', '-b', '4', '--lr', '0.05', '--output', str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert 'rarely learns' not in printed
    start = printed.splitlines()[0]
    assert 'cpu fp32' in start and 'peak lr 0.00313 = 0.05 x 4 / 64' in start, start
    assert 'backbone at lr x 0.01 = 3.13e-05 (--transfer-ratio)' in start, start
    src, ft = load(source / 'last.pth'), load(out / 'last.pth')
    assert ft['config']['opt'] == 'momentum' and ft['config']['amp'] is False
    groups = ft['optimizer']['param_groups']
    assert [g['lr'] for g in groups] == pytest.approx([0.05 * 4 / 64 * 0.01, 0.05 * 4 / 64])
    assert all(g['momentum'] == 0.9 and g['nesterov'] is False and g['weight_decay'] == 5e-4 for g in groups)
    for name in ('cls_token', 'norm.weight', 'norm.bias'):
        assert torch.equal(ft['model'][name], src['model'][name]), name
    for name in ('blocks.0.attn.qkv.weight', 'tokens_to_token.project.weight'):
        assert not torch.equal(ft['model'][name], src['model'][name]), name


def _finetune_optimizer(**overrides):
    """(names of the trainable parameters before, {group index: names}, optimizer, model)."""
    import t2tvit
    cfg = build_config('finetune', overrides={'model': 't2t_vit_7_32', 'checkpoint': 'x.pth', **overrides})
    model = t2tvit.create_model('t2t_vit_7_32', num_classes=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = builders.build_optimizer(model, cfg, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{names[id(p)] for p in g['params']} for g in opt.param_groups]
    return trainable, groups, opt, model


def test_finetune_optimizer_groups_leave_out_cls_token_and_norm():
    trainable, (backbone, head), opt, model = _finetune_optimizer()
    assert type(opt) is torch.optim.SGD and opt.defaults['nesterov'] is False and opt.defaults['momentum'] == 0.9
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([0.05 * 0.01, 0.05])
    assert head == {'head.weight', 'head.bias'}
    left_out = {'cls_token', 'norm.weight', 'norm.bias'}
    assert left_out <= trainable and backbone == trainable - head - left_out
    assert all(n.startswith(('tokens_to_token.', 'blocks.')) for n in backbone)  # as transfer_learning.py
    assert not model.cls_token.requires_grad and not model.norm.weight.requires_grad  # nor in clip_grad's norm

    trainable, (backbone, head), _, _ = _finetune_optimizer(transfer_all=True)
    assert backbone == trainable - head
