"""The t2tvit command keeps freed memory in the process (t2tvit.runtime), so steps stop page-faulting."""
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
                                reason='mallopt is glibc on Linux')

# a step's worth of large short-lived tensors: 64 MB allocated and freed five times after two warm-up times
FAULTS = """
import resource, sys, torch
from t2tvit.runtime import keep_freed_memory
kept = keep_freed_memory()
for _ in range(2):
    torch.empty(1 << 24).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(1 << 24).fill_(1.0)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env_value: str) -> tuple[str, int]:
    import os
    env = dict(os.environ, T2TVIT_KEEP_FREED_MEMORY=env_value)
    out = subprocess.run([sys.executable, '-c', FAULTS], env=env, check=True, capture_output=True, text=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


def test_freed_memory_is_kept_and_reused_without_page_faults():
    kept, faults = _faults('1')
    assert kept == 'True' and faults < 500
    # returned to the kernel (glibc's default, or T2TVIT_KEEP_FREED_MEMORY=0): every reuse maps pages again
    kept, faults = _faults('0')
    assert kept == 'False' and faults > 5 * 1000


def test_the_command_sets_it_and_import_does_not():
    code = ('import t2tvit, t2tvit.runtime as r; before = list(r._applied); from t2tvit.cli import main; '
            "main(['models']); print(before, r._applied)")
    out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == '[] [True]'
