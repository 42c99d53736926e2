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
    from .analysis.report import model_rows
    rows = model_rows(pattern=args.pattern)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        print(r['model'])
    return 0


def _add_models(sub):
    p = _command(sub, 'models', 'list the registered models', _run_models)
    p.add_argument('pattern', nargs='?', default='', help="fnmatch filter, e.g. 't2t_vit_t_*'")
    p.add_argument('--json', action='store_true', help='print the rows as JSON')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='t2tvit', description='T2T-ViT: models, checkpoints, training and analysis.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True
    for add in ADDERS:
        add(sub)
    return parser


ADDERS: List[Callable] = [_add_models]


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
