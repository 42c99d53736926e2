"""Command line: argument parsing only. Each sub-command builds its inputs and calls the library.

Each command lives in one ``_add_<command>`` function (its arguments) and one
``_run_<command>`` function (the call into the package). User mistakes raise
:class:`t2tvit.errors.UserError` and end as one line on stderr with exit status 2.
"""
import argparse
import json
import sys
from typing import Any, Callable, Dict, List, Optional

from .errors import UserError

_RUNNERS: Dict[str, Callable[[argparse.Namespace], Optional[int]]] = {}


def _command(sub, name: str, help: str, run: Callable[[argparse.Namespace], Optional[int]]):
    p = sub.add_parser(name, help=help, description=help)
    _RUNNERS[name] = run
    return p


_PRETRAINED_HELP = ("the authors' released weights of --model (its first tag, or NAME.TAG: `t2tvit models "
                    "--pretrained`), from torch hub's cache or downloaded there")


def _add_weights(p, checkpoint_help: str, required: bool = False, default=None):
    """``--checkpoint PATH`` or ``--pretrained``, spelled the same in every command that loads weights."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument('--checkpoint', metavar='PATH', help=checkpoint_help, default=default)
    g.add_argument('--pretrained', action='store_true', help=_PRETRAINED_HELP)


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
            out_dir=args.out)]
    else:
        pictures = visualize.visualize_attention(
            args.image, args.model, checkpoint=args.checkpoint, blocks=args.blocks, img_size=args.img_size,
            out_dir=args.out, stages=args.stages, query=args.query)
    for picture in pictures:
        print(picture.path)
    return 0


def _add_visualize(sub):
    p = _command(sub, 'visualize', "pictures of a model's feature maps and attention (the paper's Fig. 2)",
                 _run_visualize)
    what = p.add_subparsers(dest='what', metavar='WHAT')
    what.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('image', metavar='IMAGE', help='any image PIL reads (JPEG, PNG, ...)')
    common.add_argument('--model', required=True, help='registered model name, e.g. t2t_vit_14')
    _add_weights(common, 'weights to load (default: random weights)')
    common.add_argument('--img-size', type=int, metavar='PX',
                        help="render at this size instead of the model's (the paper uses 1024); "
                             'the position table is resized')
    common.add_argument('-o', '--out', default='runs/visualize', metavar='DIR', help='where the PNGs go')
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
                                  "as the reference counts them"), _run_profile)
    p.add_argument('--model', required=True, help='registered model name, e.g. t2t_vit_14')
    p.add_argument('--img-size', type=int, metavar='PX', help="square input size (default: the model's, 224)")
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
    for path in write_report(rows, table, args.out, markdown=args.markdown or both, png=args.png or both):
        print(path)
    return 0


def _add_report(sub):
    p = _command(sub, 'report', "every registered model's structure, params and MACs beside the paper's "
                 "numbers; top-1 against MACs and params like the paper's Fig. 1", _run_report)
    p.add_argument('--markdown', action='store_true', help='write DIR/report.md (the table)')
    p.add_argument('--png', action='store_true', help='write DIR/report.png (the plot)')
    p.add_argument('-o', '--out', default='runs/report', metavar='DIR',
                   help='where the files go (default runs/report); without --markdown/--png both are written')


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


def _fit(command: str, args) -> int:
    """Run ``fit``; only rank 0 prints errors and the how-to-resume line."""
    import signal as _signal
    from .engine.distributed import launched_by_torchrun
    from .engine.train import Interrupted, fit
    try:
        cfg = _run_config(command, args)
        if getattr(args, 'pretrained', False):
            import dataclasses
            from .factory import pretrained_weights
            path, tag = pretrained_weights(cfg.model)
            cfg = dataclasses.replace(cfg, model=tag.split('.')[0], checkpoint=path)
        if command == 'finetune' and not cfg.checkpoint:
            raise UserError('finetune needs --checkpoint PATH or --pretrained (the pretrained weights)')
        result = fit(cfg)
    except UserError:
        if _quiet_rank():
            return UserError.exit_code
        raise
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
        best = f'{result.best_metric:.2f}% top-1 at epoch {result.best_epoch}'
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


def _add_run_flags(p, finetune: bool):
    """Flags that fill the run config (engine/config.py); unset flags leave the preset's values."""
    S = argparse.SUPPRESS
    p.add_argument('data', nargs='?', metavar='DATA',
                   help='DATA/train/<class>/* and DATA/val/<class>/*, or a CIFAR folder with --dataset; '
                        'omitted: the built-in digits')
    g = p.add_argument_group('run')
    g.add_argument('-c', '--config', metavar='YAML',
                   help='a YAML file, or a preset NAME: ./configs/NAME.yaml if there, else the one shipped '
                        'with t2tvit (demo, t2t_vit_14, finetune_cifar10, ...); flags override it')
    g.add_argument('--model', default=S, help='registered model name, e.g. t2t_vit_14')
    g.add_argument('--model-kwargs', nargs='+', metavar='KEY=VALUE',
                   help='extra model arguments, e.g. depth=4')
    g.add_argument('--dataset', default=S, choices=['folder', 'cifar10', 'cifar100', 'digits'],
                   help='folder (default with DATA), cifar10/cifar100 python archives in DATA, digits')
    g.add_argument('--img-size', type=int, default=S, metavar='PX', help="input size (default: the model's)")
    g.add_argument('-o', '--output', default=S, metavar='DIR',
                   help=f"checkpoints, metrics (default runs/{'finetune' if finetune else 'train'})")
    g.add_argument('--resume', default=S, metavar='PATH|auto', help='continue a run; auto: OUTPUT/last.pth')
    g.add_argument('--overwrite', action='store_const', const=True, default=S,
                   help='replace the run already in OUTPUT')
    g.add_argument('--stop-after-epochs', type=int, default=S, metavar='K',
                   help='end after K epochs as an interruption would (the schedule still follows --epochs)')
    g.add_argument('--seed', type=int, default=S)
    g.add_argument('-j', '--workers', type=int, default=S, help='data loader processes per rank (default 4)')
    g.add_argument('--device', default=S, help='cuda, cuda:1, cpu (default: cuda if available)')
    g.add_argument('--amp', action='store_const', const=True, default=S,
                   help='autocast (bf16 where supported, else fp16); default: ' +
                        ('off (fp32, as the reference transfer recipe)' if finetune else 'on CUDA only'))
    g.add_argument('--no-amp', dest='amp', action='store_const', const=False, default=S, help='fp32')
    g.add_argument('--no-progress', dest='progress', action='store_const', const=False, default=S,
                   help='no progress bars (the per-epoch lines stay)')
    o = p.add_argument_group('optimization')
    o.add_argument('-b', '--batch-size', type=int, default=S, metavar='B', help='per process')
    o.add_argument('--epochs', type=int, default=S, metavar='E',
                   help='epochs to train, warm-up and cool-down included')
    o.add_argument('--lr', type=float, default=S,
                   help='for a global batch of --lr-base-size (scaled linearly)')
    o.add_argument('--lr-base-size', type=int, default=S, metavar='N', help='0: use --lr as given')
    o.add_argument('--opt', default=S, help="any timm optimizer (adamw, sgd, ...)")
    o.add_argument('--weight-decay', type=float, default=S)
    o.add_argument('--momentum', type=float, default=S)
    o.add_argument('--clip-grad', type=float, default=S, metavar='NORM', help='clip the gradient norm')
    o.add_argument('--sched', default=S, help='timm scheduler (cosine, step, ...)')
    o.add_argument('--warmup-epochs', type=int, default=S, help='at most a fifth of --epochs')
    o.add_argument('--warmup-lr', type=float, default=S)
    o.add_argument('--min-lr', type=float, default=S)
    o.add_argument('--cooldown-epochs', type=int, default=S,
                   help='epochs at --min-lr at the end, at most a tenth of --epochs')
    if finetune:
        o.add_argument('--transfer-ratio', type=float, default=S,
                       help='backbone lr = lr x ratio, the new head at lr (default 0.01)')
        o.add_argument('--transfer-all', action='store_const', const=True, default=S,
                       help='also train cls_token and the final norm (at the backbone lr); the reference '
                            'recipe keeps them as loaded')
    a = p.add_argument_group('augmentation and regularization')
    a.add_argument('--augment', default=S, choices=['timm', 'pad-crop', 'none'],
                   help='timm: random-resized crop, RandAugment, erasing; pad-crop: padded crop and flip')
    a.add_argument('--aa', dest='auto_augment', default=S, metavar='POLICY',
                   help='e.g. rand-m9-mstd0.5-inc1; none')
    a.add_argument('--hflip', type=float, default=S)
    a.add_argument('--reprob', type=float, default=S, help='random erasing probability')
    a.add_argument('--mixup', type=float, default=S, help='mixup alpha (0: off)')
    a.add_argument('--cutmix', type=float, default=S, help='cutmix alpha (0: off)')
    a.add_argument('--smoothing', type=float, default=S, help='label smoothing')
    a.add_argument('--drop', dest='drop_rate', type=float, default=S, help='dropout rate')
    a.add_argument('--drop-path', type=float, default=S)
    a.add_argument('--model-ema', action='store_const', const=True, default=S,
                   help='keep an EMA of the weights')
    a.add_argument('--no-model-ema', dest='model_ema', action='store_const', const=False, default=S)
    a.add_argument('--model-ema-decay', type=float, default=S)
    d = p.add_argument_group('knowledge distillation')
    d.add_argument('--teacher', default=S, metavar='MODEL', help='any timm or t2tvit model')
    d.add_argument('--teacher-checkpoint', default=S, metavar='PATH')
    d.add_argument('--distill', default=S, choices=['hard', 'soft'])
    d.add_argument('--distill-alpha', type=float, default=S, help='weight of the teacher term (default 0.5)')
    d.add_argument('--distill-tau', type=float, default=S, help='soft distillation temperature (default 1)')
    m = p.add_argument_group('memory')
    m.add_argument('--grad-checkpointing', action='store_true', default=S,
                   help='keep only the input of each T2T layer and block and rerun it in backward: the least '
                        'memory for about 20%% more time, the same weights')
    m.add_argument('--activations', default=S, choices=['lean', 'plain'],
                   help='lean (default): keep the inputs of LayerNorm and GELU for backward and recompute their '
                        'outputs, the same weights in less memory; plain: keep the outputs (a few %% faster on '
                        'small models, whose memory is no concern)')


def _run_train(args) -> int:
    return _fit('train', args)


def _add_train(sub):
    p = _command(sub, 'train', "train from scratch; defaults are the paper's ImageNet recipe", _run_train)
    _add_run_flags(p, finetune=False)


def _run_finetune(args) -> int:
    return _fit('finetune', args)


def _add_finetune(sub):
    p = _command(sub, 'finetune', 'transfer pretrained weights to new data (new head, resized position '
                 'table): the reference CIFAR recipe, SGD lr 0.05, 60 epochs', _run_finetune)
    _add_run_flags(p, finetune=True)
    _add_weights(p, 'pretrained weights (any layout t2tvit reads; EMA weights when present)',
                 default=argparse.SUPPRESS)


# -- validate / predict ---------------------------------------------------------------------------
def _run_validate(args) -> int:
    from .engine.evaluate import validate
    try:
        _use_pretrained(args)
        m = validate(args.checkpoint, model_name=args.model, data=args.data, dataset=args.dataset,
                     img_size=args.img_size, crop_pct=args.crop_pct, batch_size=args.batch_size, amp=args.amp,
                     workers=args.workers, device=args.device, progress=not args.no_progress)
    except UserError:
        if _quiet_rank():
            return UserError.exit_code
        raise
    if not m['is_main']:
        return 0
    if m['note']:
        print(m['note'], file=sys.stderr)
    if args.json:
        print(json.dumps({k: m[k] for k in ('top1', 'top5', 'loss', 'images', 'img_per_s')}))
    else:
        print(f"{m['model']} {m['checkpoint']}: top1 {m['top1']:.2f}  top5 {m['top5']:.2f}  "
              f"loss {m['loss']:.4f}  ({m['images']} images at {m['img_size']}px, crop {m['crop_pct']:g}, "
              f"{m['img_per_s']:.0f} img/s)")
    return 0


def _add_validate(sub):
    p = _command(sub, 'validate', 'top-1/top-5 and loss of a checkpoint (EMA weights by default)',
                 _run_validate)
    p.add_argument('data', nargs='?', metavar='DATA',
                   help='DATA/val (or DATA holding class folders), a CIFAR folder with --dataset; '
                        'omitted: the data the checkpoint was trained on')
    p.add_argument('--model', help='registered model name (default: the one the checkpoint names)')
    _add_weights(p, 'the weights to evaluate', required=True)
    p.add_argument('--dataset', choices=['folder', 'cifar10', 'cifar100', 'digits'])
    p.add_argument('--img-size', type=int, metavar='PX',
                   help='evaluate at this size (position table resized)')
    p.add_argument('--crop-pct', type=float, help="center-crop fraction (default: the model's)")
    p.add_argument('-b', '--batch-size', type=int, default=100)
    p.add_argument('--amp', action='store_const', const=True, help='autocast (default on CUDA only)')
    p.add_argument('--no-amp', dest='amp', action='store_const', const=False)
    p.add_argument('-j', '--workers', type=int, default=4)
    p.add_argument('--device')
    p.add_argument('--no-progress', action='store_true')
    p.add_argument('--json', action='store_true',
                   help='print {"top1", "top5", "loss", "images", "img_per_s"}')


def _run_predict(args) -> int:
    from .engine.evaluate import predict_files
    _use_pretrained(args)
    results = predict_files(args.images, args.checkpoint, model_name=args.model, img_size=args.img_size,
                            topk=args.topk, device=args.device)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        tops = ', '.join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r['top'])
        print(f"{r['image']}: {tops}")
    return 0


def _add_predict(sub):
    p = _command(sub, 'predict', 'top-k classes of image files (names from the checkpoint, or ImageNet)',
                 _run_predict)
    p.add_argument('images', nargs='+', metavar='IMAGE')
    p.add_argument('--model', help='registered model name (default: the one the checkpoint names)')
    _add_weights(p, 'the weights to predict with', required=True)
    p.add_argument('--topk', type=int, default=5)
    p.add_argument('--img-size', type=int, metavar='PX')
    p.add_argument('--device')
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
    if args.no_progress:
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
                 _run_demo)
    p.add_argument('-o', '--output', default='runs/demo', metavar='DIR')
    p.add_argument('--epochs', type=int, help="override the preset's epochs (quicker, less accurate)")
    p.add_argument('--no-progress', action='store_true')


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
                 "t2tvit's safetensors file", _run_convert)
    p.add_argument('input', metavar='IN', nargs='?', help='reference .pth.tar, CIFAR transfer file, state dict, '
                   'PASSL .pdparams, t2tvit .safetensors or a training checkpoint (or --pretrained)')
    p.add_argument('output', metavar='OUT', help='the file to write (--to hf: a folder)')
    p.add_argument('--to', required=True, choices=['reference', 't2tvit', 'hf'],
                   help='reference: a .pth.tar with state_dict (+ state_dict_ema) the reference code loads; '
                        't2tvit: safetensors with the model config in its metadata; hf: a folder as timm\'s hub '
                        "export writes it (config.json + model.safetensors), for timm.create_model('local-dir:OUT', "
                        'pretrained=True) or push_to_hf_hub')
    p.add_argument('--model', help='registered model name, or NAME.TAG (needed when IN does not name its model; '
                   'a tag brings its preprocessing and class names to --to hf)')
    p.add_argument('--pretrained', action='store_true', help=_PRETRAINED_HELP + ', instead of IN')
    p.add_argument('--no-ema', action='store_true', help='--to t2tvit / hf: write the raw weights, not the EMA')


# -- benchmark ------------------------------------------------------------------------------------
def _run_benchmark(args) -> int:
    from .analysis.benchmark import BenchmarkConfig, format_result, run_benchmark
    cfg = BenchmarkConfig(model=args.model, mode=args.mode, batch=args.batch_size, img_size=args.img_size,
                          dtype=args.dtype, attn=args.attn, compile=args.compile, device=args.device,
                          steps=args.steps, warmup=args.warmup, grad_checkpointing=args.grad_checkpointing,
                          activations=args.activations or '', cast_weights=args.cast_weights,
                          fused_stem=args.fused_stem)
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
                 'GFLOP/s against the matmul peak of this device', _run_benchmark)
    p.add_argument('--model', required=True, help='registered model name, e.g. t2t_vit_14')
    p.add_argument('--mode', default='infer', choices=['infer', 'train'],
                   help='infer: forward under inference_mode; train: forward, backward and AdamW step')
    p.add_argument('-b', '--batch-size', type=int, default=32, metavar='B')
    p.add_argument('--img-size', type=int, metavar='PX', help="square input size (default: the model's)")
    p.add_argument('--dtype', default='fp32', choices=['fp32', 'bf16', 'fp16', 'int8'],
                   help='bf16/fp16 run under autocast with float32 weights; int8: the blocks and head dynamically '
                        'quantized (CPU inference)')
    p.add_argument('--cast-weights', action='store_true',
                   help='bf16/fp16 inference with the weights cast once (model.to(dtype)), not autocast')
    p.add_argument('--fused-stem', action='store_true',
                   help='inference with each soft split + LayerNorm + projection as one strided convolution '
                        '(model.set_fused_stem)')
    p.add_argument('--attn', default='sdpa', choices=['sdpa', 'naive'],
                   help='naive: the reference explicit softmax(q k^T) v')
    p.add_argument('--compile', action='store_true', help='torch.compile(fullgraph=True); prints the compile time')
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
    p.add_argument('--json', action='store_true', help='print one JSON object: ' + ', '.join(
        ['model', 'mode', 'batch', 'img_size', 'dtype', 'attn', 'compile', 'device', 'img_per_s', 'ms_per_step',
         'peak_mem_mb', 'gflops_per_s', 'matmul_peak_gflops', 'cast_weights']))


# -- export ---------------------------------------------------------------------------------------
def _run_export(args) -> int:
    from .export import export_cli
    _use_pretrained(args)
    return export_cli(model=args.model, checkpoint=args.checkpoint, fmt=args.format, out=args.output,
                      img_size=args.img_size, dynamic_batch=args.dynamic_batch, opset=args.opset,
                      verify=not args.no_verify, quantize=args.quantize)


def _add_export(sub):
    p = _command(sub, 'export', 'write a model for deployment: ONNX, TorchScript or a torch.export program, '
                 'checked against PyTorch on a random batch', _run_export)
    p.add_argument('--model', help='registered model name (optional with a t2tvit checkpoint)')
    _add_weights(p, 'weights to export (any layout `t2tvit validate` reads)')
    p.add_argument('--format', default='onnx', choices=['onnx', 'torchscript', 'exported', 'openvino'],
                   help='openvino: OpenVINO IR (.xml + .bin), needs pip install "t2tvit[openvino]"')
    p.add_argument('-o', '--output', metavar='OUT', help='file to write (default: MODEL.onnx, .pt, .pt2 or .xml)')
    p.add_argument('--img-size', type=int, metavar='PX', help="square input size (default: the model's)")
    p.add_argument('--dynamic-batch', action='store_true', help='any batch size at run time (default: batch 1)')
    p.add_argument('--opset', type=int, default=18, help='ONNX opset (17 or newer; default 18)')
    p.add_argument('--no-verify', action='store_true', help='skip running the exported file against PyTorch')
    p.add_argument('--quantize', choices=['int8'],
                   help="ONNX with the blocks' and head's weights in int8 (onnxruntime dynamic quantization)")


# -- ablate ---------------------------------------------------------------------------------------
def _run_ablate(args) -> int:
    from .analysis.ablate import run_ablation, summary
    result = run_ablation(args.data, epochs=args.epochs, budget_minutes=args.budget_minutes, seeds=args.seeds,
                          img_size=args.img_size, out_dir=args.out, jobs=args.jobs)
    print(f'\n{summary(result)}\n')
    for path in result.files:
        print(path)
    return 0


def _add_ablate(sub):
    p = _command(sub, 'ablate', "retrain the paper's ablations (Table 7) at small scale with one recipe "
                 'over several seeds; writes ablation.csv, ablation.png and summary.md', _run_ablate)
    p.add_argument('data', nargs='?', metavar='DATA',
                   help='an image folder (DATA/train, DATA/val) or a CIFAR folder (default: the built-in digits)')
    p.add_argument('--epochs', type=int, default=30, help='epochs of every run, at most (default 30)')
    p.add_argument('--budget-minutes', type=float, default=10.0, metavar='M',
                   help='fewer epochs when all runs would not fit in M minutes (default 10)')
    p.add_argument('--seeds', type=int, default=3, help='seeds per model (default 3; fewer gives no spread)')
    p.add_argument('--img-size', type=int, metavar='PX', help='default: 16 for the digits, 32 otherwise')
    p.add_argument('--jobs', type=int, metavar='N', help='runs at once (default: 2 on a CPU, 1 on a GPU)')
    p.add_argument('-o', '--out', default='runs/ablate', metavar='DIR', help='where the files go')


# -- serve ----------------------------------------------------------------------------------------
def _run_serve(args) -> int:
    from .serve import run_serve
    return run_serve(args)


def _add_serve(sub):
    p = _command(sub, 'serve', "a model behind a local web page and HTTP API, requests batched together "
                 "(pip install 't2tvit[serve]')", _run_serve)
    p.add_argument('--model', help='registered model name, or NAME.TAG (default: the one the checkpoint names)')
    _add_weights(p, 'the weights to serve (any layout `t2tvit predict` reads)', required=True)
    p.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1: this machine only)')
    p.add_argument('--port', type=int, default=8000, help='default 8000; 0 picks a free one (printed)')
    p.add_argument('--max-batch', type=int, default=16, metavar='B', help='images run together at most (default 16)')
    p.add_argument('--max-wait-ms', type=float, default=5.0, metavar='MS',
                   help='how long the oldest waiting image may wait for requests still arriving (default 5)')
    p.add_argument('--max-queue', type=int, default=64, metavar='N',
                   help='images waiting at most; past it a request gets 503 with Retry-After (default 64)')
    p.add_argument('--dtype', default='fp32', choices=['fp32', 'bf16'], help='bf16: autocast over float32 weights')
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
                          _add_train, _add_validate, _add_finetune, _add_predict, _add_demo, _add_convert,
                          _add_benchmark, _add_export, _add_serve]


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(_RUNNERS[args.command](args) or 0)
    except UserError as e:
        print(f't2tvit {args.command}: error: {e}', file=sys.stderr)
        return e.exit_code
    except FileNotFoundError as e:
        print(f't2tvit {args.command}: error: {e.filename or e}: no such file (check the path)', file=sys.stderr)
        return 2
