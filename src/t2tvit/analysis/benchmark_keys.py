"""The keys of ``t2tvit benchmark --json``, in the order it prints them: the one list the benchmark writes
(``BenchmarkResult.to_json``), the CLI's help names and the tests check. No torch import, so that
``t2tvit --help`` stays fast.

Each key maps to the decimals its float is rounded to (None: written as it is). A key is read from the
result when it has that attribute (the measured figures and the image size), otherwise from its config.
"""
from typing import Dict, Optional

JSON_FIELDS: Dict[str, Optional[int]] = {
    'model': None,
    'mode': None,
    'batch': None,
    'img_size': None,
    'dtype': None,
    'attn': None,
    'compile': None,
    'device': None,
    'img_per_s': 3,
    'ms_per_step': 3,
    'peak_mem_mb': 1,
    'gflops_per_s': 2,
    'matmul_peak_gflops': 2,
    'cast_weights': None,
    'fused_stem': None,
    'compile_stem': None,
}
JSON_KEYS = tuple(JSON_FIELDS)
