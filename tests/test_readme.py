"""README stays true: its commands parse with the real CLI and its Python snippets run."""
import re
import shlex

import pytest

from conftest import ROOT
from t2tvit.cli import build_parser

README = (ROOT / 'README.md').read_text()


def _blocks(lang: str):
    return re.findall(r'```' + lang + r'\n(.*?)```', README, flags=re.S)


def _cli_lines():
    lines = []
    for block in _blocks('bash'):
        for line in block.replace('\\\n', ' ').splitlines():
            line = line.strip()
            m = re.search(r'(?:^|\s)(?:t2tvit|-m t2tvit)\s+(.*)$', line)
            if m and not line.startswith('#') and 'pip install' not in line:
                lines.append(m.group(1))
    return lines


def test_readme_opens_with_the_two_commands():
    head = README[:2500]
    assert 'make demo' in head and 'make test' in head


@pytest.mark.parametrize('args', _cli_lines())
def test_every_readme_command_parses_with_the_cli(args):
    parts = [p for p in shlex.split(args) if p not in ('\\',)]
    build_parser().parse_args(parts)  # SystemExit (a wrong flag or command) fails the test


def test_readme_has_cli_commands():
    assert len(_cli_lines()) >= 5


def test_readme_model_table_is_what_the_code_counts():
    from t2tvit.analysis.report import markdown_table, model_rows
    table = README.split('<!-- model-table:start -->')[1].split('<!-- model-table:end -->')[0].strip()
    assert table == markdown_table(model_rows()).strip()


def test_readme_benchmark_table_is_results_md():
    """README's benchmark section is benchmarks/RESULTS.md as compare.py writes it (``--readme``), not a copy
    edited apart from it. Whether RESULTS.md's numbers were measured, only rerunning compare.py can tell; what
    a test can check is that every verdict agrees with its numbers (below)."""
    start, end = '<!-- bench-table:start -->', '<!-- bench-table:end -->'
    section = README[README.index(start) + len(start):README.index(end)].strip()
    results = (ROOT / 'benchmarks' / 'RESULTS.md').read_text().strip()
    assert section == results
    assert '| comparison | measure |' in section and 'Machine:' in section


def _compare_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location('compare', ROOT / 'benchmarks' / 'compare.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _number(text: str):
    m = re.search(r'(-?\d+(?:\.\d+)?)\s*(x|%)', text)
    return None if m is None else float(m.group(1)) / (100 if m.group(2) == '%' else 1)


def _verdict_errors(table: str, met_rule) -> tuple:
    """(rows whose ``met`` or memory ratio disagrees with their own numbers, rows checked)."""
    errors, checked = [], 0
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if len(cells) != 7 or cells[0] == 'comparison' or set(cells[0]) <= {'-'}:
            continue
        comparison, measure, a, b, ratio, target, met = cells
        if measure == 'peak memory of a step':
            mb = [float(re.search(r'(\d+(?:\.\d+)?) MB', x).group(1)) for x in (a, b)]
            checked += 1
            # the MB shown are rounded: a few MB moves their quotient by more than the ratio's own rounding
            if abs(mb[0] / mb[1] - _number(ratio)) > 0.01 + (0.5 + 0.5 * mb[0] / mb[1]) / mb[1]:
                errors.append(f'{comparison}: {a} / {b} is not {ratio}')
        bound = re.fullmatch(r'(>=|<=) (\d+(?:\.\d+)?)(x|%)', target)
        value = _number(ratio) if _number(ratio) is not None else _number(a)
        if bound and value is not None:
            limit = float(bound.group(2)) / (100 if bound.group(3) == '%' else 1)
            expected = met_rule(value, limit, bound.group(1) == '>=') if round(value - limit, 6) else met
        elif target == 'finite':
            expected = 'yes' if all(abs(float(x)) < float('inf') for x in re.findall(r'loss (\S+)', a)) else 'no'
        elif target == 'bound':  # a target over the reference path against the machine's matmul rate
            need = float(re.search(r'needs (\d+)%', ratio).group(1))
            expected = 'out of reach' if need > 100 else 'reachable'
        elif target == 'all':
            k, n = re.search(r'(\d+)/(\d+)', a).groups()
            expected = 'yes' if k == n else 'no'
        else:
            continue
        checked += 1
        if met != expected:
            errors.append(f'{comparison} / {measure}: {ratio or a} against {target} says {met!r}, not {expected!r}')
    return errors, checked


@pytest.mark.parametrize('name', ['RESULTS.md', 'RESULTS_low_precision.md'])
def test_benchmark_verdicts_follow_from_their_numbers(name):
    """A number edited by hand (or a target moved) without its verdict: the table contradicts itself."""
    table = (ROOT / 'benchmarks' / name).read_text()
    errors, checked = _verdict_errors(table, _compare_module()._met)
    assert not errors, errors
    assert checked >= 5, f'{name}: only {checked} rows could be checked'
    # the check itself: a ratio edited past its target is caught
    edited = table.replace('| 1.47x faster | >= 1.8x | no |', '| 1.87x faster | >= 1.8x | no |', 1)
    if edited != table:
        assert _verdict_errors(edited, _compare_module()._met)[0]


def test_bound_row_says_what_share_of_the_matmul_rate_a_target_needs():
    """1.5x over a reference path at half the machine's matmul rate needs 75% of it; over one at 80%, 120%: out
    of reach for any implementation on that machine."""
    from t2tvit.analysis.benchmark import BenchmarkConfig, BenchmarkResult
    compare = _compare_module()
    cfg = BenchmarkConfig(model='t2t_vit_7', mode='infer', dtype='bf16')

    def result(ms):  # 100 GFLOP a step against a 200 GFLOP/s matmul rate
        return BenchmarkResult(config=cfg, img_size=224, step_ms=[ms], flops_per_step=100e9, matmul_gflops=[200.0])

    row = compare._bound_row('x', result(800), result(1000), 'ours', 'naive', 1.5)
    assert (row.a, row.b, row.ratio, row.met) == ('ours 62%', 'naive 50%', '1.5x needs 75%', 'reachable')
    assert 'bf16 matmul rate' in row.measure
    assert compare._bound_row('x', result(500), result(625), 'ours', 'naive', 1.5).met == 'out of reach'
    at_the_rate = compare._bound_row('x', result(500), result(748.5), 'ours', 'naive', 1.5)  # 100.2%
    assert (at_the_rate.ratio, at_the_rate.met) == ('1.5x needs 100%', 'reachable')
    table = '| x | m | a | b | 1.5x needs 120% | bound | reachable |'
    assert _verdict_errors(table, compare._met)[0]


def _lines_of(command: str):
    return [shlex.split(line) for line in _cli_lines() if line.split()[0] == command]


def test_readme_export_commands_run_on_a_demo_checkpoint(tmp_path, monkeypatch, capsys):
    """The Export section as written, on a one-epoch `--config demo` run (the demo's own checkpoint layout)."""
    from t2tvit.cli import main
    pytest.importorskip('onnxruntime', reason='onnxruntime is not installed (pip install onnxruntime)')
    pytest.importorskip('onnxscript', reason='the ONNX exporter needs onnxscript (pip install onnxscript)')
    monkeypatch.chdir(tmp_path)
    assert main(['train', '--config', 'demo', '-o', 'runs/demo', '--epochs', '1', '--warmup-epochs', '0',
                 '--no-progress']) == 0
    lines = _lines_of('export')
    assert {line[line.index('--format') + 1] for line in lines} == {'onnx', 'torchscript', 'exported', 'openvino'}
    for args in lines:
        capsys.readouterr()
        assert main(args) == 0, args
        printed = capsys.readouterr().out
        assert (tmp_path / args[args.index('-o') + 1]).is_file()
        # an int8 file is checked for the same top-1, not for float32's tolerance
        assert ('same top-1' if '--quantize' in args else '(within') in printed, printed


def _run_small_benchmark(args, capsys) -> str:
    """A README benchmark line with its flags as written, on batch 2 at 64 px for one step."""
    from t2tvit.cli import main
    small = list(args)
    small[small.index('-b') + 1] = '2'
    assert main(small + ['--img-size', '64', '--steps', '1', '--warmup', '0', '--no-memory']) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize('args', [a for a in _lines_of('benchmark') if '--compile' not in a])
def test_readme_benchmark_commands_run_in_small(args, capsys):
    assert ('"img_per_s"' if '--json' in args else 'img/s') in _run_small_benchmark(args, capsys)


@pytest.mark.slow
@pytest.mark.parametrize('args', [a for a in _lines_of('benchmark') if '--compile' in a])
def test_readme_compile_benchmark_runs_in_small(args, capsys):
    assert 'compile:' in _run_small_benchmark(args, capsys)


def test_readme_loader_table_is_results_loader_md():
    results = (ROOT / 'benchmarks' / 'RESULTS_loader.md').read_text()
    rows = [ln for ln in results.splitlines() if ln.startswith('| folder') or ln.startswith('| shards')]
    assert len(rows) >= 4
    section = README.split('### Data from shards and from datasets files', 1)[1]
    assert all(row in section for row in rows)
