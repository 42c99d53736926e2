"""Command line: argument parsing only. Each sub-command builds its inputs and calls the library.

Each command lives in one ``_add_<command>`` function (its arguments) and one
``_run_<command>`` function (the call into the package). User mistakes raise
:class:`t2tvit.errors.UserError` and end as one line on stderr with exit status 2.
"""
import argparse
import json
import logging
import sys
from typing import Any, Callable, Dict, List, Optional

from .errors import UserError

_RUNNERS: Dict[str, Callable[[argparse.Namespace], Optional[int]]] = {}


def _command(sub, name: str, help: str, run: Callable[[argparse.Namespace], Optional[int]], parents=()):
    p = sub.add_parser(name, help=help, description=help, parents=list(parents))
    _RUNNERS[name] = run
    return p


_PRETRAINED_HELP = ("the authors' released weights of --model (its first tag, or NAME.TAG: `t2tvit models "
                    "--pretrained`), from torch hub's cache or downloaded there")


def _add_weights(p, checkpoint_help: str, required: bool = False, default=None):
    """``--checkpoint PATH`` or ``--pretrained``, spelled the same in every command that loads weights."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument('--checkpoint', metavar='PATH', help=checkpoint_help, default=default)
    g.add_argument('--pretrained', action='store_true', help=_PRETRAINED_HELP)


S = argparse.SUPPRESS


def _field_flag(p, name: str, **overrides):
    """The flag(s) of RunConfig field ``name``, spelled as its metadata declares (engine/config.py); ``overrides``
    are this command's default (argparse.SUPPRESS unless given: a run's unset flags leave the preset's values),
    required or help."""
    from .engine.config import FIELDS, field_type
    f = FIELDS[name]
    flag, names = f.metadata['flag'], f.metadata['flag'].option_strings(name)
    kw = {'dest': name, 'default': S, 'help': f.metadata['help'], **overrides}
    if 'help' not in overrides and kw['default'] is not S and flag.switch != 'off':
        kw['help'] = _with_default(kw['help'], kw['default'])
    kw['help'] = kw['help'].replace('%', '%%')
    if not flag.switch:
        kw = {'type': field_type(name), 'choices': f.metadata['choices'], 'metavar': flag.metavar, **kw}
        return p.add_argument(*names, **kw)
    if flag.switch in ('on', 'both'):
        p.add_argument(*names, action='store_const', const=True, **kw)
    if flag.switch in ('off', 'both'):
        p.add_argument('--no-' + names[-1][2:], action='store_const', const=False,
                       **{**kw, 'help': kw['help'] if flag.switch == 'off' else f'{names[-1]} off'})


def _shared(model=None, img_size=None, output=None, weights=None, progress=False,
            inference=None) -> argparse.ArgumentParser:
    """A parent parser of the flags every command spells the same way: --model, --img-size, -o/--output (with
    the hidden old spelling --out), --checkpoint/--pretrained, --no-progress, and the inference precision
    (--dtype, --cast-weights, --fused-stem, --compile-stem, --compile: t2tvit/precision.py). Each argument is
    None (not in this command) or this command's overrides ({'required': True}, {'default': ..., 'help': ...})."""
    p = argparse.ArgumentParser(add_help=False)
    for name, given in (('model', model), ('img_size', img_size), ('output', output)):
        if given is not None:
            _field_flag(p, name, **{'default': None, **given})
    if output is not None:
        p.add_argument('--out', dest='output', default=S, help=S)
    if weights is not None:
        _add_weights(p, **weights)
    if progress:
        _field_flag(p, 'progress', default=True)
    if inference is not None:
        _add_inference(p, **inference)
    return p


def _add_inference(p, dtype_default='fp32', dtype_help='', compile_note=''):
    from .precision import INFER_DTYPES
    p.add_argument('--dtype', default=dtype_default, choices=INFER_DTYPES,
                   help=dtype_help or 'fp32 (default); bf16/fp16: autocast over the float32 weights (--cast-weights: '
                   'cast once); int8: the blocks\' and head\'s Linear layers dynamically quantized (CPU)')
    p.add_argument('--cast-weights', action='store_true',
                   help='bf16/fp16 inference with the weights cast once (model.to(dtype)), not autocast')
    p.add_argument('--fused-stem', action='store_true',
                   help='inference with each soft split + LayerNorm + projection as one strided convolution '
                        '(model.set_fused_stem)')
    p.add_argument('--compile-stem', action='store_true',
                   help='the T2T stem through torch.compile, the blocks eager (model.set_compiled_stem()): with '
                        '--fused-stem the fused path, else the unfold one; the first batch compiles (seconds to '
                        'a minute on a CPU)' + compile_note)
    p.add_argument('--compile', action='store_true',
                   help='inference through torch.compile(fullgraph=True) with inductor\'s freezing (the weights folded '
                        'in as constants): the fastest bf16 path on a CPU; the first batch compiles' + compile_note)


def _precision(args):
    """The InferencePrecision of the --dtype/--cast-weights/--fused-stem/--compile-stem/--compile flags."""
    from .precision import InferencePrecision
    return InferencePrecision.from_args(args)


def _use_pretrained(args) -> None:
    """``--pretrained``: the released weights of ``--model`` become ``--checkpoint``, the tag becomes ``--model``
    (so the model carries the tag's preprocessing and class names)."""
    if not getattr(args, 'pretrained', False):
        return
    from .factory import pretrained_weights
    if not getattr(args, 'model', None):
        raise UserError('--pretrained needs --model NAME or NAME.TAG (`t2tvit models --pretrained` lists the tags)')
    args.checkpoint, args.model = pretrained_weights(args.model)


# -- models ---------------------------------------------------------------------------------------
def _run_models(args) -> int:
    from .analysis.report import markdown_table, model_rows
    if args.pretrained:
        return _print_pretrained(args)
    rows = model_rows(pattern=args.pattern, counts=args.json or args.markdown)
    if args.markdown:
        print(markdown_table(rows))
        return 0
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        print(r['model'])
    return 0


def _print_pretrained(args) -> int:
    import os
    from .factory import pretrained_tags
    rows = pretrained_tags(args.pattern)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if args.markdown:
        from .analysis.report import pretrained_markdown
        print(pretrained_markdown(rows))
        return 0
    width = max([len(r['tag']) for r in rows] + [3])
    print(f"{'tag':<{width}}  {'file':<30}  top-1  {'data':<11}  cached")
    for r in rows:
        print(f"{r['tag']:<{width}}  {r['file']:<30}  {r['top1']:>5.1f}  {r['dataset']:<11}  "
              f"{'yes' if r['cached'] else 'no'}")
    if rows:
        print(f"cache: {os.path.dirname(rows[0]['path'])} (a file placed there under its name is used as is)")
    return 0


def _add_models(sub):
    p = _command(sub, 'models', 'list the registered models', _run_models)
    p.add_argument('pattern', nargs='?', default='', help="fnmatch filter, e.g. 't2t_vit_t_*'")
    p.add_argument('--json', action='store_true', help='print the rows as JSON, with params and MACs')
    p.add_argument('--markdown', action='store_true',
                   help="print the README's model table: structure, params, MACs and the paper's numbers")
    p.add_argument('--pretrained', action='store_true',
                   help="list the pretrained tags: release file, published top-1, whether torch hub's cache has "
                        'it (with --markdown: the README table)')


# -- visualize ------------------------------------------------------------------------------------
def _run_visualize(args) -> int:
    from .analysis import visualize
    _use_pretrained(args)
    if args.what == 'features':
        pictures = [visualize.visualize_features(
            args.image, args.model, checkpoint=args.checkpoint, layers=args.layers, channels=args.channels,
            img_size=args.img_size, compare=args.compare, compare_checkpoint=args.compare_checkpoint,
            out_dir=args.output)]
    else:
        pictures = visualize.visualize_attention(
            args.image, args.model, checkpoint=args.checkpoint, blocks=args.blocks, img_size=args.img_size,
            out_dir=args.output, stages=args.stages, query=args.query)
    for picture in pictures:
        print(picture.path)
    return 0


def _add_visualize(sub):
    p = _command(sub, 'visualize', "pictures of a model's feature maps and attention (the paper's Fig. 2)",
                 _run_visualize)
    what = p.add_subparsers(dest='what', metavar='WHAT')
    what.required = True
    common = _shared(model={'required': True},
                     img_size={'help': "render at this size instead of the model's (the paper uses 1024); the "
                                       'position table is resized'},
                     output={'default': 'runs/visualize', 'help': 'where the PNGs go'},
                     weights={'checkpoint_help': 'weights to load (default: random weights)'})
    common.add_argument('image', metavar='IMAGE', help='any image PIL reads (JPEG, PNG, ...)')
    f = what.add_parser('features', parents=[common], help='feature maps of T2T stages and blocks',
                        description='Feature maps reshaped from tokens, channels min-max scaled; all-zero or '
                                    "extreme channels outlined in red. Writes DIR/features.png.")
    f.add_argument('--layers', nargs='+', metavar='LAYER',
                   help='t2t1 t2t2 and blocks as blockN or N, counted from 1 as in the paper '
                        '(default: the T2T stages, the first and the last block)')
    f.add_argument('--channels', type=int, default=16, help='channels shown per layer (default 16)')
    f.add_argument('--compare', choices=['resnet50'], help="add timm's resnet50 conv1 features")
    f.add_argument('--compare-checkpoint', metavar='PATH',
                   help='resnet50 weights for --compare (default: random, nothing is downloaded)')
    a = what.add_parser('attention', parents=[common], help='class-token attention per head, and rollout',
                        description='Class-token attention of each head of the chosen blocks and the rollout '
                                    'through the whole backbone, over the image. Writes '
                                    'DIR/attention_heads.png and DIR/attention_rollout.png.')
    a.add_argument('--blocks', nargs='+', type=int, metavar='N',
                   help='blocks counted from 1 (default: the last two)')
    a.add_argument('--stages', nargs='+', choices=['t2t1', 't2t2'], metavar='STAGE',
                   help="also draw one query's attention in the T2T stages (t2t1 t2t2): the Transformer layer's "
                        "softmax weights, or the Performer's implicit ones; writes DIR/attention_t2t.png")
    a.add_argument('--query', nargs=2, type=float, metavar=('X', 'Y'),
                   help='with --stages: the query pixel of the (resized) input (default: its centre)')


# -- profile --------------------------------------------------------------------------------------
def _run_profile(args) -> int:
    from .analysis.profile import format_profile, profile
    from .factory import UnknownModelError
    try:
        result = profile(args.model, img_size=args.img_size)
    except UnknownModelError as e:
        raise UserError(str(e)) from None
    except ValueError as e:  # an image size the model's geometry cannot tile
        raise UserError(f'--img-size {args.img_size}: {e}') from None
    print(json.dumps(result.as_json()) if args.json else format_profile(result))
    return 0


def _add_profile(sub):
    p = _command(sub, 'profile', ("count a model's parameters and MACs (batch 1), beside the paper's numbers; "
                                  "params include the fixed position table and Performer features, buffers here, "
                                  "as the reference counts them"), _run_profile,
                 parents=[_shared(model={'required': True}, img_size={})])
    p.add_argument('--json', action='store_true',
                   help='print {"model", "img_size", "params", "macs"} (MACs as an integer count)')


# -- report ---------------------------------------------------------------------------------------
def _run_report(args) -> int:
    from .analysis.report import markdown_table, model_rows
    from .analysis.visualize import write_report
    rows = model_rows()
    table = markdown_table(rows)
    print(table)
    both = not (args.markdown or args.png)
    for path in write_report(rows, table, args.output, markdown=args.markdown or both, png=args.png or both):
        print(path)
    return 0


def _add_report(sub):
    p = _command(sub, 'report', "every registered model's structure, params and MACs beside the paper's "
                 "numbers; top-1 against MACs and params like the paper's Fig. 1", _run_report,
                 parents=[_shared(output={'default': 'runs/report', 'help': 'where the files go (default '
                                          'runs/report); without --markdown/--png both are written'})])
    p.add_argument('--markdown', action='store_true', help='write DIR/report.md (the table)')
    p.add_argument('--png', action='store_true', help='write DIR/report.png (the plot)')


# -- train / finetune -----------------------------------------------------------------------------
def _key_values(items: Optional[List[str]]) -> Dict[str, Any]:
    import yaml
    out: Dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise UserError(f'--model-kwargs {item}: expected KEY=VALUE, e.g. depth=4')
        out[key.replace('-', '_')] = yaml.safe_load(value)
    return out


def _run_config(command: str, args):
    from .engine.config import FIELDS, build_config
    given = {k: v for k, v in vars(args).items() if k in FIELDS and k not in ('data', 'model_kwargs')}
    if getattr(args, 'data', None) is not None:
        given['data'] = args.data
    if getattr(args, 'model_kwargs', None) is not None:
        given['model_kwargs'] = _key_values(args.model_kwargs)
    if given.get('auto_augment') in ('none', ''):
        given['auto_augment'] = None
    return build_config(command, getattr(args, 'config', None), given)


def _quiet_rank() -> bool:
    from .engine.distributed import env_rank
    return env_rank() != 0


def _lost_peer(error: RuntimeError) -> Optional[str]:
    """The short reason when ``error`` is a collective that failed because a peer process died, else None."""
    import torch.distributed as dist
    text = str(error)
    signs = ('Connection reset by peer', 'Connection closed by peer', 'Broken pipe', 'Socket Timeout',
             'Connection refused', 'NCCL communicator was aborted', 'remote process exited')
    hit = next((m for m in signs if m in text), None)
    if hit is None and not isinstance(error, dist.DistNetworkError):
        return None
    return hit or text.splitlines()[0][:120]


def _run_training(command: str, args) -> int:
    """Run ``engine.train``; only rank 0 prints errors and the how-to-resume line."""
    import signal as _signal
    from .engine.distributed import launched_by_torchrun
    from .engine.train import Interrupted, train
    try:
        cfg = _run_config(command, args)
        if getattr(args, 'pretrained', False):
            import dataclasses
            from .factory import pretrained_weights
            path, tag = pretrained_weights(cfg.model)
            cfg = dataclasses.replace(cfg, model=tag.split('.')[0], checkpoint=path)
        if command == 'finetune' and not cfg.checkpoint:
            raise UserError('finetune needs --checkpoint PATH or --pretrained (the pretrained weights)')
        result = train(cfg)
    except UserError:
        if _quiet_rank():
            return UserError.exit_code
        raise
    except RuntimeError as e:
        lost = _lost_peer(e)
        if lost is None or not launched_by_torchrun():
            raise
        from .engine.distributed import env_rank
        # one line per surviving rank instead of pages of tracebacks; torchrun's own summary follows
        print(f't2tvit {command}: rank {env_rank()} stopped: another process of the job is gone ({lost}); nothing '
              f'was written for the step in flight, {cfg.output}/last.pth stays the resume point (torchrun '
              f'--max-restarts N restarts the job with --resume auto; or rerun with --resume auto)', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if not _quiet_rank():
            print(f't2tvit {command}: interrupted before training started; nothing was saved', file=sys.stderr)
        return 130
    except Interrupted as e:
        if not _quiet_rank():
            print(f't2tvit {command}: {e}', file=sys.stderr)
            resume = _resume_command(command, cfg.output, launched_by_torchrun())
            print(f'resume with: {resume}', file=sys.stderr)
        return e.exit_code if e.signum in (_signal.SIGINT, _signal.SIGTERM) else 128 + e.signum
    if _quiet_rank():
        return 0
    best = '-'
    if result.best_metric is not None:
        whose = {'ema': ' (EMA weights)', 'model': ' (model weights; the EMA was lower)'}.get(result.best_kept, '')
        best = f'{result.best_metric:.2f}% top-1{whose} at epoch {result.best_epoch}'
    if result.stopped_early:
        print(f'stopped after {result.epochs_done}/{result.total_epochs} epochs as asked '
              f'(--stop-after-epochs); best so far {best}')
        print(f'resume with: {_resume_command(command, cfg.output, launched_by_torchrun())}')
    else:
        print(f'done: {result.epochs_done} epochs, best {best}; checkpoints, metrics.csv and curves.png in '
              f'{result.output}')
    return 0


def _resume_command(command: str, output: str, torchrun: bool) -> str:
    import os
    import shlex
    launcher = 't2tvit'
    if torchrun:
        launcher = f'torchrun --nproc_per_node {os.environ.get("LOCAL_WORLD_SIZE", "N")} -m t2tvit'
    config = shlex.quote(os.path.join(output, 'config.yaml'))
    return f'{launcher} {command} --config {config} --resume auto'


def _add_run_flags(p, command: str):
    """The flags of ``command``'s run config, one per RunConfig field that declares one (engine/config.py), with
    the command's default in its help; unset flags leave the preset's values."""
    from .engine.config import FIELDS, defaults
    base = defaults(command)
    p.add_argument('data', nargs='?', metavar='DATA',
                   help='DATA/train/<class>/* and DATA/val/<class>/*, or a CIFAR folder with --dataset; '
                        'omitted: the built-in digits')
    groups = {'run': p.add_argument_group('run')}
    groups['run'].add_argument('-c', '--config', metavar='YAML',
                               help='a YAML file, or a preset NAME: ./configs/NAME.yaml if there, else the one '
                                    'shipped with t2tvit (demo, t2t_vit_14, finetune_cifar10, ...); flags override it')
    groups['run'].add_argument('--model-kwargs', nargs='+', metavar='KEY=VALUE',
                               help=FIELDS['model_kwargs'].metadata['help'])
    for name, f in FIELDS.items():
        flag = f.metadata['flag']
        if flag is None or command not in flag.commands:
            continue
        group = groups.get(flag.group) or groups.setdefault(flag.group, p.add_argument_group(flag.group))
        shown = f.metadata['help'] if flag.switch == 'off' else _with_default(f.metadata['help'], getattr(base, name))
        _field_flag(group, name, help=shown)


def _with_default(help: str, value) -> str:
    if isinstance(value, bool):
        return f"{help} (default {'on' if value else 'off'})"
    return help if value in (None, '') else f'{help} (default {value})'


def _run_train(args) -> int:
    return _run_training('train', args)


def _add_train(sub):
    p = _command(sub, 'train', "train from scratch; defaults are the paper's ImageNet recipe", _run_train)
    _add_run_flags(p, 'train')


def _run_finetune(args) -> int:
    return _run_training('finetune', args)


def _add_finetune(sub):
    p = _command(sub, 'finetune', 'transfer pretrained weights to new data (new head, resized position '
                 'table): the reference CIFAR recipe, SGD lr 0.05, 60 epochs', _run_finetune)
    _add_run_flags(p, 'finetune')
    _add_weights(p, 'pretrained weights (any layout t2tvit reads; EMA weights when present)',
                 default=argparse.SUPPRESS)


# -- validate / predict ---------------------------------------------------------------------------
def _run_validate(args) -> int:
    from .engine.evaluate import validate
    precision = _precision(args)
    if args.dtype is None and precision.plain:
        precision = None  # no precision flag: --amp decides, as before
    elif args.amp is not None:
        raise UserError('--amp picks autocast by itself: with --dtype, --cast-weights or a stem flag drop it '
                        '(--dtype bf16 is --amp on a CPU)')
    try:
        _use_pretrained(args)
        m = validate(args.checkpoint, model_name=args.model, data=args.data, dataset=args.dataset,
                     img_size=args.img_size, crop_pct=args.crop_pct, batch_size=args.batch_size, amp=args.amp,
                     workers=args.workers, device=args.device, progress=args.progress, precision=precision)
    except UserError:
        if _quiet_rank():
            return UserError.exit_code
        raise
    if not m['is_main']:
        return 0
    if m['note']:
        print(m['note'], file=sys.stderr)
    if m.get('held_out'):
        print(f"validating on the run's held-out images: {m['held_out']}", file=sys.stderr)
    if args.json:
        print(json.dumps({k: m[k] for k in ('top1', 'top5', 'loss', 'images', 'img_per_s')}))
    else:
        how = f', {precision.describe()}' if precision is not None else ''
        print(f"{m['model']} {m['checkpoint']}: top1 {m['top1']:.2f}  top5 {m['top5']:.2f}  "
              f"loss {m['loss']:.4f}  ({m['images']} images at {m['img_size']}px, crop {m['crop_pct']:g}{how}, "
              f"{m['img_per_s']:.0f} img/s)")
    return 0


def _add_validate(sub):
    p = _command(sub, 'validate', 'top-1/top-5 and loss of a checkpoint (EMA weights by default)',
                 _run_validate, parents=[_shared(
                     model={}, img_size={}, progress=True,
                     weights={'checkpoint_help': 'the weights to evaluate', 'required': True},
                     inference={'dtype_default': None,
                                'dtype_help': 'as in predict (fp32, bf16/fp16 autocast or with --cast-weights, int8 on '
                                              'the CPU); not given: --amp decides'})])
    p.add_argument('data', nargs='?', metavar='DATA',
                   help='DATA/val (or DATA holding class folders), a CIFAR folder with --dataset; '
                        'omitted: the data the checkpoint was trained on')
    for name, default in (('dataset', None), ('crop_pct', None), ('batch_size', 100), ('amp', None),
                          ('workers', 4), ('device', None)):
        _field_flag(p, name, default=default)
    p.add_argument('--json', action='store_true',
                   help='print {"top1", "top5", "loss", "images", "img_per_s"}')


def _run_predict(args) -> int:
    from .engine.evaluate import predict_files
    _use_pretrained(args)
    if args.batch_size < 1:
        raise UserError(f'--batch-size must be at least 1, got {args.batch_size}')
    results = predict_files(args.images, args.checkpoint, model_name=args.model, img_size=args.img_size,
                            topk=args.topk, device=args.device, precision=_precision(args),
                            batch_size=args.batch_size)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        tops = ', '.join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r['top'])
        print(f"{r['image']}: {tops}")
    return 0


def _add_predict(sub):
    p = _command(sub, 'predict', 'top-k classes of image files (names from the checkpoint, or ImageNet)',
                 _run_predict, parents=[_shared(model={}, img_size={}, inference={}, weights={
                     'checkpoint_help': 'the weights to predict with', 'required': True})])
    p.add_argument('images', nargs='+', metavar='IMAGE',
                   help='image files (JPEG, PNG, ...) or folders: every image under a folder, sorted')
    p.add_argument('--topk', type=int, default=5)
    p.add_argument('-b', '--batch-size', type=int, default=32, metavar='B',
                   help='images through the model at a time (default 32)')
    _field_flag(p, 'device', default=None)
    p.add_argument('--json', action='store_true',
                   help='print a list of {"image", "top": [{"class", "prob"}]}')


# -- demo -----------------------------------------------------------------------------------------
def _run_demo(args) -> int:
    """``make demo``: train on the built-in digits, validate best.pth, predict held-out digits."""
    import time
    from pathlib import Path
    from .data import digits_samples
    start = time.perf_counter()
    out = Path(args.output)
    steps = [['train', '--config', 'demo', '--output', str(out), '--overwrite']]
    if args.epochs:
        steps[0] += ['--epochs', str(args.epochs)]
    if not args.progress:
        steps[0] += ['--no-progress']
    steps.append(['validate', '--checkpoint', str(out / 'best.pth'), '--no-progress'])
    for argv in steps:
        print(f'\n$ t2tvit {" ".join(argv)}', flush=True)
        code = main(argv)
        if code:
            return code
    samples = digits_samples(out / 'samples')
    argv = ['predict', *[str(p) for p, _ in samples], '--checkpoint', str(out / 'best.pth'), '--topk', '1']
    print(f'\n$ t2tvit predict {out}/samples/*.png --checkpoint {out}/best.pth --topk 1', flush=True)
    code = main(argv)
    if code:
        return code
    print(f'\ndemo done in {time.perf_counter() - start:.0f}s: {out}/metrics.csv, {out}/curves.png, '
          f'{out}/best.pth, {out}/last.pth, {out}/config.yaml '
          f'(the file names of the samples give their true digit)')
    return 0


def _add_demo(sub):
    p = _command(sub, 'demo', 'train on the built-in digits, validate best.pth, predict held-out digits',
                 _run_demo, parents=[_shared(output={'default': 'runs/demo'}, progress=True)])
    p.add_argument('--epochs', type=int, help="override the preset's epochs (quicker, less accurate)")


# -- convert --------------------------------------------------------------------------------------
def _run_convert(args) -> int:
    from .checkpoint import convert_checkpoint
    if args.pretrained == bool(args.input):
        raise UserError('give IN (a checkpoint file) or --pretrained (the released weights of --model), one of them')
    _use_pretrained(args)
    done = convert_checkpoint(args.input or args.checkpoint, args.output, to=args.to, model_name=args.model,
                              use_ema=not args.no_ema)
    layout = {'reference': 'reference .pth.tar', 't2tvit': 't2tvit safetensors',
              'hf': 'Hugging Face folder (config.json, model.safetensors)'}[args.to]
    print(f"{done['path']}: {layout}, {done['model']} ({done['weights']}, "
          f"{done['model_kwargs'].get('num_classes', 1000)} classes), from a {done['layout']} checkpoint")
    return 0


def _add_convert(sub):
    p = _command(sub, 'convert', 'rewrite a checkpoint (any layout t2tvit reads) for the reference code or as '
                 "t2tvit's safetensors file", _run_convert,
                 parents=[_shared(model={'help': 'registered model name, or NAME.TAG (needed when IN does not name '
                                                 'its model; a tag brings its preprocessing and class names to --to '
                                                 'hf)'})])
    p.add_argument('input', metavar='IN', nargs='?', help='reference .pth.tar, CIFAR transfer file, state dict, '
                   'PASSL .pdparams, t2tvit .safetensors or a training checkpoint (or --pretrained)')
    p.add_argument('output', metavar='OUT', help='the file to write (--to hf: a folder)')
    p.add_argument('--to', required=True, choices=['reference', 't2tvit', 'hf'],
                   help='reference: a .pth.tar with state_dict (+ state_dict_ema) the reference code loads; '
                        't2tvit: safetensors with the model config in its metadata; hf: a folder as timm\'s hub '
                        "export writes it (config.json + model.safetensors), for timm.create_model('local-dir:OUT', "
                        'pretrained=True) or push_to_hf_hub')
    p.add_argument('--pretrained', action='store_true', help=_PRETRAINED_HELP + ', instead of IN')
    p.add_argument('--no-ema', action='store_true', help='--to t2tvit / hf: write the raw weights, not the EMA')


# -- prepare ----------------------------------------------------------------------------------------
def _run_prepare(args) -> int:
    from .sources import MANIFEST, prepare
    if len(args.paths) == 1 and args.dataset != 'digits':
        raise UserError('give DATA and OUT (the images and the folder to write the shards to); '
                        'OUT alone only with --dataset digits')
    if len(args.paths) > 2:
        raise UserError(f'give DATA and OUT, two paths (got {len(args.paths)})')
    data, out = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    dataset = args.dataset or 'folder'
    manifest = prepare(dataset, data, out, shard_images=args.shard_images, seed=args.seed,
                       progress=args.progress)
    for split, entry in manifest['splits'].items():
        print(f"{out}/{split}: {entry['images']} images of {len(manifest['classes'])} classes in "
              f"{len(entry['shards'])} shards")
    print(f'{out}/{MANIFEST}: the manifest (train, validate, predict and ablate read {out} or it)')
    return 0


def _add_prepare(sub):
    p = _command(sub, 'prepare', 'write images (a folder tree, CIFAR archives, the digits) as WebDataset tar '
                 'shards with a manifest, for train/validate/predict/ablate to read locally, from a URL or a pipe:',
                 _run_prepare, parents=[_shared(progress=True)])
    p.add_argument('paths', metavar='DATA OUT', nargs='+',
                   help='the images (DATA/train/<class>/*.jpg and DATA/val/..., or DATA/<class>/*.jpg, or CIFAR '
                        'archives with --dataset cifar10) and the folder to write (OUT alone with --dataset digits)')
    p.add_argument('--dataset', choices=['folder', 'cifar10', 'cifar100', 'digits'],
                   help='what DATA holds (default folder)')
    p.add_argument('--shard-images', type=int, default=1000, metavar='N',
                   help='images per shard (default 1000: ~100 MB of ImageNet JPEGs, a good size to stream)')
    p.add_argument('--seed', type=int, default=0, help='the shuffle that mixes the classes in each shard (default 0)')


# -- benchmark ------------------------------------------------------------------------------------
def _run_benchmark(args) -> int:
    from .analysis.benchmark import BenchmarkConfig, format_result, run_benchmark
    cfg = BenchmarkConfig(model=args.model, mode=args.mode, batch=args.batch_size, img_size=args.img_size,
                          dtype=args.dtype, attn=args.attn, compile=args.compile, device=args.device,
                          steps=args.steps, warmup=args.warmup, grad_checkpointing=args.grad_checkpointing,
                          activations=args.activations or '', cast_weights=args.cast_weights,
                          fused_stem=args.fused_stem, compile_stem=args.compile_stem)
    try:
        if args.breakdown:
            from .analysis.benchmark import format_breakdown, run_breakdown
            print(format_breakdown(cfg, run_breakdown(cfg)))
            return 0
        if args.compare:
            from .analysis.benchmark import format_compare, run_compare
            print(format_compare(run_compare(cfg, args.compare)))
            return 0
        result = run_benchmark(cfg, memory=not args.no_memory)
    except ValueError as e:  # an image size the model's geometry cannot tile
        raise UserError(f'--img-size {args.img_size}: {e}') from None
    print(json.dumps(result.to_json()) if args.json else format_result(result))
    return 0


def _add_benchmark(sub):
    p = _command(sub, 'benchmark', 'time training or inference steps: img/s, ms/step, peak memory of a step, '
                 'GFLOP/s against the matmul peak of this device', _run_benchmark,
                 parents=[_shared(model={'required': True}, img_size={}, inference={
                     'dtype_help': 'fp32 (default); bf16/fp16 under autocast over float32 weights (inference with '
                                   '--cast-weights: cast once); int8: the blocks and head dynamically quantized (CPU '
                                   'inference)',
                     'compile_note': '; in --mode train too (the stem: its unfold path; --compile: without '
                                     'freezing); prints the compile time'})])
    p.add_argument('--mode', default='infer', choices=['infer', 'train'],
                   help='infer: forward under inference_mode; train: forward, backward and AdamW step')
    p.add_argument('-b', '--batch-size', type=int, default=32, metavar='B')
    p.add_argument('--attn', default='sdpa', choices=['sdpa', 'naive'],
                   help='naive: the reference explicit softmax(q k^T) v')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--steps', type=int, default=5, metavar='N', help='timed steps (the median is reported)')
    p.add_argument('--warmup', type=int, default=2, metavar='N', help='untimed steps first (default 2)')
    p.add_argument('--grad-checkpointing', action='store_true',
                   help='train mode: keep only the input of each T2T layer and block, rerun it in backward')
    p.add_argument('--activations', choices=['lean', 'plain'],
                   help='train mode: keep the inputs of LayerNorm and GELU for backward and recompute their outputs '
                        '(lean, the default with --attn sdpa), or keep every output as plain autograd does '
                        '(plain, the default with --attn naive: the reference math)')
    p.add_argument('--breakdown', action='store_true',
                   help='time the forward pass by stage: T2T stem, Transformer blocks, head (share of the step)')
    p.add_argument('--compare', nargs='+', metavar='TIMM_MODEL',
                   help='time timm models (random weights) beside this one, step by step in turn, with their '
                        'published top-1, e.g. vit_small_patch16_224 resnet50')
    p.add_argument('--no-memory', action='store_true',
                   help='skip the peak-memory measurement (on CPU a second process; peak_mem_mb is null)')
    from .analysis.benchmark_keys import JSON_KEYS
    p.add_argument('--json', action='store_true', help='print one JSON object: ' + ', '.join(JSON_KEYS))


# -- export ---------------------------------------------------------------------------------------
def _run_export(args) -> int:
    from .export import export_cli
    _use_pretrained(args)
    return export_cli(model=args.model, checkpoint=args.checkpoint, fmt=args.format, out=args.output,
                      img_size=args.img_size, dynamic_batch=args.dynamic_batch, opset=args.opset,
                      verify=not args.no_verify, quantize=args.quantize)


def _add_export(sub):
    p = _command(sub, 'export', 'write a model for deployment: ONNX, TorchScript or a torch.export program, '
                 'checked against PyTorch on a random batch', _run_export,
                 parents=[_shared(model={}, img_size={}, weights={
                     'checkpoint_help': 'weights to export (any layout `t2tvit validate` reads)'},
                     output={'metavar': 'OUT', 'help': 'file to write (default: MODEL.onnx, .pt, .pt2 or .xml)'})])
    p.add_argument('--format', default='onnx', choices=['onnx', 'torchscript', 'exported', 'openvino'],
                   help='openvino: OpenVINO IR (.xml + .bin), needs pip install "t2tvit[openvino]"')
    p.add_argument('--dynamic-batch', action='store_true', help='any batch size at run time (default: batch 1)')
    p.add_argument('--opset', type=int, default=18, help='ONNX opset (17 or newer; default 18)')
    p.add_argument('--no-verify', action='store_true', help='skip running the exported file against PyTorch')
    p.add_argument('--quantize', choices=['int8'],
                   help="ONNX with the blocks' and head's weights in int8 (onnxruntime dynamic quantization)")


# -- ablate ---------------------------------------------------------------------------------------
def _run_ablate(args) -> int:
    from .analysis.ablate import run_ablation, summary
    result = run_ablation(args.data, epochs=args.epochs, budget_minutes=args.budget_minutes, seeds=args.seeds,
                          img_size=args.img_size, out_dir=args.output, jobs=args.jobs, val_split=args.val_split)
    print(f'\n{summary(result)}\n')
    for path in result.files:
        print(path)
    return 0


def _add_ablate(sub):
    p = _command(sub, 'ablate', "retrain the paper's ablations (Table 7) at small scale with one recipe "
                 'over several seeds; writes ablation.csv, ablation.png and summary.md', _run_ablate,
                 parents=[_shared(img_size={'help': 'default: 16 for the digits, 32 otherwise'},
                                  output={'default': 'runs/ablate', 'help': 'where the files go'})])
    p.add_argument('data', nargs='?', metavar='DATA',
                   help='an image folder (DATA/train, DATA/val) or a CIFAR folder (default: the built-in digits)')
    p.add_argument('--epochs', type=int, default=30, help='epochs of every run, at most (default 30)')
    p.add_argument('--budget-minutes', type=float, default=10.0, metavar='M',
                   help='fewer epochs when all runs would not fit in M minutes (default 10)')
    p.add_argument('--seeds', type=int, default=3, help='seeds per model (default 3; fewer gives no spread)')
    p.add_argument('--jobs', type=int, metavar='N', help='runs at once (default: 2 on a CPU, 1 on a GPU)')
    p.add_argument('--val-split', type=float, default=0.0, metavar='FRACTION',
                   help='validate on this share of the training images, stratified (for a folder without val/, '
                        'e.g. CIFAR-10 as JPEG folders: 0.1)')


# -- serve ----------------------------------------------------------------------------------------
def _run_serve(args) -> int:
    from .serve import run_serve
    return run_serve(args)


def _add_serve(sub):
    p = _command(sub, 'serve', "a model behind a local web page and HTTP API, requests batched together "
                 "(pip install 't2tvit[serve]')", _run_serve, parents=[_shared(
                     model={'help': 'registered model name, or NAME.TAG (default: the one the checkpoint names)'},
                     weights={'checkpoint_help': 'the weights to serve (any layout `t2tvit predict` reads)',
                              'required': True},
                     inference={'compile_note': '; compiled before the server listens'})])
    p.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1: this machine only)')
    p.add_argument('--port', type=int, default=8000, help='default 8000; 0 picks a free one (printed)')
    p.add_argument('--max-batch', type=int, default=16, metavar='B', help='images run together at most (default 16)')
    p.add_argument('--max-wait-ms', type=float, default=5.0, metavar='MS',
                   help='how long the oldest waiting image may wait for requests still arriving (default 5)')
    p.add_argument('--max-queue', type=int, default=64, metavar='N',
                   help='images waiting at most; past it a request gets 503 with Retry-After (default 64)')
    p.add_argument('--device', help='cpu, cuda, cuda:1 (default: cuda if available)')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='t2tvit', description='T2T-ViT: models, checkpoints, training and analysis.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True
    for add in ADDERS:
        add(sub)
    return parser


ADDERS: List[Callable] = [_add_models, _add_visualize, _add_profile, _add_report, _add_ablate,
                          _add_train, _add_validate, _add_finetune, _add_predict, _add_demo, _add_prepare, _add_convert,
                          _add_benchmark, _add_export, _add_serve]


def _one_line(e: UserError) -> str:
    """The message; of an error re-raised from a DataLoader worker (torch puts the worker's traceback in it), the
    worker's own message."""
    text = str(e)
    if 'Original Traceback' in text:
        last = text.strip().splitlines()[-1]
        return last.split(': ', 1)[1] if ': ' in last else last
    return text


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .runtime import keep_freed_memory
    keep_freed_memory()
    # torch built with CUDA warns "No CUDA runtime is found, using CUDA_HOME=..." when --compile builds its CPU
    # kernels on a machine without a GPU: a notice about a GPU the command does not use
    logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
    try:
        return int(_RUNNERS[args.command](args) or 0)
    except UserError as e:
        print(f't2tvit {args.command}: error: {_one_line(e)}', file=sys.stderr)
        return e.exit_code
    except FileNotFoundError as e:
        print(f't2tvit {args.command}: error: {e.filename or e}: no such file (check the path)', file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C in predict, validate, a compiling server's warm-up...: no traceback
        print(f't2tvit {args.command}: interrupted', file=sys.stderr)
        return 130
