"""`t2tvit benchmark` runs every mode and prints well-formed JSON; timings are never asserted."""
import json
import math

import pytest
import torch

from t2tvit.analysis.benchmark import JSON_KEYS, BenchmarkConfig, BenchmarkResult, run_pair, speedup
from t2tvit.cli import main

SMALL = ['--model', 't2t_vit_7', '--img-size', '32', '-b', '2', '--steps', '2', '--warmup', '1']


def _bench_json(capsys, *flags) -> dict:
    assert main(['benchmark', *SMALL, '--json', *flags]) == 0
    return json.loads(capsys.readouterr().out)


def _check_well_formed(row: dict, **expected):
    assert tuple(row) == JSON_KEYS
    for key, value in expected.items():
        assert row[key] == value
    for key in ('img_per_s', 'ms_per_step', 'gflops_per_s', 'matmul_peak_gflops'):
        assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0


def test_infer_json_with_peak_memory_from_a_fresh_process(capsys):
    row = _bench_json(capsys)
    _check_well_formed(row, model='t2t_vit_7', mode='infer', batch=2, img_size=32, dtype='fp32', attn='sdpa',
                       compile=False, device='cpu')
    assert isinstance(row['peak_mem_mb'], float) and row['peak_mem_mb'] >= 0


@pytest.mark.parametrize('flags', [
    ['--mode', 'train', '--attn', 'naive'],
    ['--mode', 'train', '--dtype', 'bf16', '--grad-checkpointing'],
    ['--mode', 'train', '--activations', 'plain'],
    ['--dtype', 'bf16'],
])
def test_train_and_low_precision_json(capsys, flags):
    row = _bench_json(capsys, '--no-memory', *flags)
    mode = 'train' if 'train' in flags else 'infer'
    _check_well_formed(row, mode=mode, dtype='bf16' if 'bf16' in flags else 'fp32',
                       attn='naive' if 'naive' in flags else 'sdpa')
    assert row['peak_mem_mb'] is None


def test_human_readable_report(capsys):
    assert main(['benchmark', *SMALL, '--no-memory']) == 0
    out = capsys.readouterr().out
    assert 'img/s' in out and 'matmul rate' in out


def test_pairs_alternate_and_report_a_speedup():
    a = BenchmarkConfig('t2t_vit_7', batch=2, img_size=32, steps=2, warmup=1)
    b = BenchmarkConfig('t2t_vit_7', batch=2, img_size=32, steps=2, warmup=1, attn='naive')
    ra, rb = run_pair(a, b, memory=False)
    assert len(ra.step_ms) == len(rb.step_ms) == 2
    assert ra.config.attn == 'sdpa' and rb.config.attn == 'naive'


def test_speedup_is_the_median_of_per_round_ratios():
    """B's step time over A's round by round, then the median: a slow round (here the second, where the
    machine was busy for both) moves neither setting against the other, unlike a ratio of medians (1.0 here)."""
    def result(step_ms):
        return BenchmarkResult(BenchmarkConfig('t2t_vit_7'), 224, step_ms, 1.0, [1.0] * len(step_ms))

    a, b = result([10.0, 40.0, 20.0]), result([20.0, 120.0, 20.0])  # rounds: 2x, 3x, 1x faster
    assert speedup(a, b) == 2.0
    assert speedup(b, a) == 0.5
    assert speedup(a, a) == 1.0


def test_user_mistakes_end_in_one_line(capsys):
    assert main(['benchmark', '--model', 't2t_vit_77']) == 2
    assert 'unknown model' in capsys.readouterr().err
    assert main(['benchmark', *SMALL, '--steps', '0']) == 2
    if not torch.cuda.is_available():
        assert main(['benchmark', *SMALL, '--device', 'cuda']) == 2
        assert 'no CUDA device' in capsys.readouterr().err


@pytest.mark.slow
def test_the_gpu_sections_of_compare_run_on_the_cpu_at_a_small_batch():
    """compare.py's GPU sections only run where a GPU is lent: run them here at batch 2 (and 1), so that the
    first run on a GPU measures instead of failing. Every row carries a ratio and a verdict that follows from
    it; the numbers themselves are the CPU's and are not asserted."""
    from test_readme import _compare_module, _verdict_errors
    compare = _compare_module()
    opts = compare.Options(device='cpu', steps=1, warmup=1, batch_scale=1 / 64, full=False, images=8,
                           checkpoint=None)
    for name in ('gpu_low_precision', 'gpu_attn'):
        rows = compare.GPU_SECTIONS[name](opts)
        table = compare.markdown(rows, [name])
        assert len(rows) >= 4 and all(r.comparison and r.measure for r in rows), table
        assert not _verdict_errors(table, compare._met)[0], table
        assert 'nan' not in table and 'inf ' not in table, table
