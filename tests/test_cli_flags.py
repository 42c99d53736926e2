"""Every command spells a flag the same way, and train/finetune's flags are RunConfig's fields."""
import dataclasses

import pytest

from t2tvit.cli import _run_config, build_parser
from t2tvit.engine.config import FIELDS, RunConfig, build_config, defaults

OUTPUT_COMMANDS = [['train'], ['finetune', '--checkpoint', 'w.pth'], ['demo'], ['report'], ['ablate'],
                   ['visualize', 'features', 'x.png', '--model', 't2t_vit_7'], ['export', '--model', 't2t_vit_7']]


@pytest.mark.parametrize('argv', OUTPUT_COMMANDS, ids=lambda a: a[0])
@pytest.mark.parametrize('spelling', ['-o', '--output', '--out'])
def test_output_is_one_flag_in_every_command(argv, spelling):
    assert build_parser().parse_args([*argv, spelling, 'somewhere']).output == 'somewhere'


def test_the_old_out_spelling_is_hidden_from_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(['report', '--help'])
    text = capsys.readouterr().out
    assert '--output' in text and '--out ' not in text and '--out,' not in text


@pytest.mark.parametrize('argv, unset', [(['validate', '--checkpoint', 'w.pth'], True), (['demo'], True),
                                         (['train'], None)])
def test_no_progress_sets_progress_false_everywhere(argv, unset):
    parser = build_parser()
    assert getattr(parser.parse_args(argv), 'progress', None) is unset  # train: unset leaves the preset's value
    assert parser.parse_args([*argv, '--no-progress']).progress is False


def _sample(name):
    """A value of field ``name`` other than its default, as a command-line token and as the config holds it."""
    f = FIELDS[name]
    if f.metadata['choices']:
        value = [c for c in f.metadata['choices'] if c != getattr(RunConfig(), name)][-1]
        return [value], value
    kind = {int: 3, float: 0.25, str: 'xyz'}
    from t2tvit.engine.config import field_type
    value = kind[field_type(name)] if field_type(name) in kind else None
    return [str(value)], value


@pytest.mark.parametrize('command', ['train', 'finetune'])
def test_every_run_flag_fills_its_field(command):
    parser = build_parser()
    base = ['finetune', '--checkpoint', 'w.pth'] if command == 'finetune' else ['train']
    flagged = [(n, f.metadata['flag']) for n, f in FIELDS.items()
               if f.metadata['flag'] is not None and command in f.metadata['flag'].commands]
    assert {'model', 'output', 'batch_size', 'lr', 'epochs', 'progress', 'amp'} <= {n for n, _ in flagged}
    for name, flag in flagged:
        option = flag.option_strings(name)[-1]
        if flag.switch:
            for token, value in (([option], True), (['--no-' + option[2:]], False)):
                if (value and flag.switch == 'off') or (not value and flag.switch == 'on'):
                    continue
                assert getattr(parser.parse_args([*base, *token]), name) is value, token
            continue
        tokens, value = _sample(name)
        args = parser.parse_args([*base, option, *tokens])
        assert getattr(args, name) == value, option
    # and through the config: flags override the command's defaults
    args = parser.parse_args([*base, '--model', 't2t_vit_7', '--epochs', '7', '-b', '8', '--no-amp'])
    cfg = _run_config(command, args)
    assert (cfg.epochs, cfg.batch_size, cfg.amp) == (7, 8, False)
    assert cfg.lr == defaults(command).lr  # unset flags keep the defaults


def test_run_help_shows_each_commands_default(capsys):
    for command, epochs in (('train', 310), ('finetune', 60)):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, '--help'])
        text = ' '.join(capsys.readouterr().out.split())
        assert f'warm-up and cool-down included (default {epochs})' in text


def test_finetune_defaults_are_the_transfer_recipe():
    cfg = build_config('finetune', overrides={'model': 't2t_vit_7', 'checkpoint': 'w.pth', 'data': 'd'})
    recipe = dict(output='runs/finetune', epochs=60, warmup_epochs=0, cooldown_epochs=0, min_lr=2e-4, opt='momentum',
                  lr=0.05, lr_base_size=64, weight_decay=5e-4, momentum=0.9, batch_size=64, transfer_ratio=0.01,
                  img_size=224, crop_pct=1.0, interpolation='bilinear', augment='pad-crop', auto_augment=None,
                  mixup=0.0, cutmix=0.0, smoothing=0.0, reprob=0.0, model_ema=False, amp=False)
    assert {k: getattr(cfg, k) for k in recipe} == recipe
    assert dataclasses.replace(cfg, **{k: getattr(RunConfig(), k) for k in recipe}).to_dict() == dataclasses.replace(
        build_config('train', overrides={'model': 't2t_vit_7', 'checkpoint': 'w.pth', 'data': 'd'})).to_dict()
