"""Command line: argument parsing only. Each sub-command builds its inputs and calls the library.

Each command lives in one ``_add_<command>`` function (its arguments) and one
``_run_<command>`` function (the call into the package). User mistakes raise
:class:`t2tvit.errors.UserError` and end as one line on stderr with exit status 2.
"""
import argparse
import json
import sys
from typing import Callable, Dict, List, Optional

from .errors import UserError

_RUNNERS: Dict[str, Callable[[argparse.Namespace], Optional[int]]] = {}


def _command(sub, name: str, help: str, run: Callable[[argparse.Namespace], Optional[int]]):
    p = sub.add_parser(name, help=help, description=help)
    _RUNNERS[name] = run
    return p


# -- models ---------------------------------------------------------------------------------------
def _run_models(args) -> int:
    from .analysis.report import markdown_table, model_rows
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


def _add_models(sub):
    p = _command(sub, 'models', 'list the registered models', _run_models)
    p.add_argument('pattern', nargs='?', default='', help="fnmatch filter, e.g. 't2t_vit_t_*'")
    p.add_argument('--json', action='store_true', help='print the rows as JSON, with params and MACs')
    p.add_argument('--markdown', action='store_true',
                   help="print the README's model table: structure, params, MACs and the paper's numbers")


# -- visualize ------------------------------------------------------------------------------------
def _run_visualize(args) -> int:
    from .analysis import visualize
    if args.what == 'features':
        pictures = [visualize.visualize_features(
            args.image, args.model, checkpoint=args.checkpoint, layers=args.layers, channels=args.channels,
            img_size=args.img_size, compare=args.compare, compare_checkpoint=args.compare_checkpoint,
            out_dir=args.out)]
    else:
        pictures = visualize.visualize_attention(
            args.image, args.model, checkpoint=args.checkpoint, blocks=args.blocks, img_size=args.img_size,
            out_dir=args.out)
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
    common.add_argument('--checkpoint', metavar='PATH', help='weights to load (default: random weights)')
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
    p = _command(sub, 'profile', "count a model's parameters and MACs (batch 1), beside the paper's numbers",
                 _run_profile)
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


# -- convert --------------------------------------------------------------------------------------
def _run_convert(args) -> int:
    from .checkpoint import convert_checkpoint
    done = convert_checkpoint(args.input, args.output, to=args.to, model_name=args.model, use_ema=not args.no_ema)
    layout = 'reference .pth.tar' if args.to == 'reference' else 't2tvit safetensors'
    print(f"{done['path']}: {layout}, {done['model']} ({done['weights']}, "
          f"{done['model_kwargs'].get('num_classes', 1000)} classes), from a {done['layout']} checkpoint")
    return 0


def _add_convert(sub):
    p = _command(sub, 'convert', 'rewrite a checkpoint (any layout t2tvit reads) for the reference code or as '
                 "t2tvit's safetensors file", _run_convert)
    p.add_argument('input', metavar='IN', help='reference .pth.tar, CIFAR transfer file, state dict, PASSL '
                   '.pdparams, t2tvit .safetensors or a training checkpoint')
    p.add_argument('output', metavar='OUT', help='the file to write')
    p.add_argument('--to', required=True, choices=['reference', 't2tvit'],
                   help='reference: a .pth.tar with state_dict (+ state_dict_ema) the reference code loads; '
                        't2tvit: safetensors with the model config in its metadata')
    p.add_argument('--model', help='registered model name (needed when IN does not name its model)')
    p.add_argument('--no-ema', action='store_true', help='--to t2tvit: write the raw weights, not the EMA')


# -- benchmark ------------------------------------------------------------------------------------
def _run_benchmark(args) -> int:
    from .analysis.benchmark import BenchmarkConfig, format_result, run_benchmark
    cfg = BenchmarkConfig(model=args.model, mode=args.mode, batch=args.batch_size, img_size=args.img_size,
                          dtype=args.dtype, attn=args.attn, compile=args.compile, device=args.device,
                          steps=args.steps, warmup=args.warmup, grad_checkpointing=args.grad_checkpointing)
    try:
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
    p.add_argument('--dtype', default='fp32', choices=['fp32', 'bf16', 'fp16'],
                   help='bf16/fp16 run under autocast with float32 weights')
    p.add_argument('--attn', default='sdpa', choices=['sdpa', 'naive'],
                   help='naive: the reference explicit softmax(q k^T) v')
    p.add_argument('--compile', action='store_true', help='torch.compile(fullgraph=True); prints the compile time')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--steps', type=int, default=5, metavar='N', help='timed steps (the median is reported)')
    p.add_argument('--warmup', type=int, default=2, metavar='N', help='untimed steps first (default 2)')
    p.add_argument('--grad-checkpointing', action='store_true',
                   help='recompute T2T layers and blocks in the backward pass (train mode)')
    p.add_argument('--no-memory', action='store_true',
                   help='skip the peak-memory measurement (on CPU a second process; peak_mem_mb is null)')
    p.add_argument('--json', action='store_true', help='print one JSON object: ' + ', '.join(
        ['model', 'mode', 'batch', 'img_size', 'dtype', 'attn', 'compile', 'device', 'img_per_s', 'ms_per_step',
         'peak_mem_mb', 'gflops_per_s', 'matmul_peak_gflops']))


# -- export ---------------------------------------------------------------------------------------
def _run_export(args) -> int:
    from .export import export_cli
    return export_cli(model=args.model, checkpoint=args.checkpoint, fmt=args.format, out=args.output,
                      img_size=args.img_size, dynamic_batch=args.dynamic_batch, opset=args.opset,
                      verify=not args.no_verify)


def _add_export(sub):
    p = _command(sub, 'export', 'write a model for deployment: ONNX, TorchScript or a torch.export program, '
                 'checked against PyTorch on a random batch', _run_export)
    p.add_argument('--model', help='registered model name (optional with a t2tvit checkpoint)')
    p.add_argument('--checkpoint', metavar='PATH', help='weights to export (any layout `t2tvit validate` reads)')
    p.add_argument('--format', default='onnx', choices=['onnx', 'torchscript', 'exported'])
    p.add_argument('-o', '--output', metavar='OUT', help='file to write (default: MODEL.onnx, .pt or .pt2)')
    p.add_argument('--img-size', type=int, metavar='PX', help="square input size (default: the model's)")
    p.add_argument('--dynamic-batch', action='store_true', help='any batch size at run time (default: batch 1)')
    p.add_argument('--opset', type=int, default=18, help='ONNX opset (17 or newer; default 18)')
    p.add_argument('--no-verify', action='store_true', help='skip running the exported file against PyTorch')


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='t2tvit', description='T2T-ViT: models, checkpoints, training and analysis.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True
    for add in ADDERS:
        add(sub)
    return parser


ADDERS: List[Callable] = [_add_models, _add_visualize, _add_profile, _add_report, _add_ablate, _add_convert,
                          _add_benchmark, _add_export]


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
