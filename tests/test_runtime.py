"""The t2tvit command keeps freed memory in the process (t2tvit.runtime), so steps stop page-faulting."""
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
                                reason='mallopt is glibc on Linux')

# a step's worth of large short-lived tensors: 64 MB allocated and freed five times after two warm-up times
FAULTS = """
import os, resource, sys, torch
from t2tvit.runtime import keep_freed_memory
kept = keep_freed_memory()
for _ in range(2):
    torch.empty(1 << 24).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(1 << 24).fill_(1.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
rss_mb = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
print(kept, faults, rss_mb)
"""


def _faults(env_value: str) -> tuple[str, int, float]:
    import os
    env = dict(os.environ, T2TVIT_KEEP_FREED_MEMORY=env_value)
    out = subprocess.run([sys.executable, '-c', FAULTS], env=env, check=True, capture_output=True, text=True)
    kept, faults, rss_mb = out.stdout.split()
    return kept, int(faults), float(rss_mb)


def _huge_pages_always() -> bool:
    try:
        with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
            return '[always]' in f.read()
    except OSError:
        return False


PAGES = (1 << 24) * 4 // 4096  # one 64 MB tensor's 4 KiB pages


def test_freed_memory_is_kept_and_reused_without_page_faults():
    # returned to the kernel (glibc's default, or T2TVIT_KEEP_FREED_MEMORY=0): every reuse maps its pages again
    kept, returned, rss_returned = _faults('0')
    assert kept == 'False'
    # kept: reused from the heap; at most one more mapping, when small objects took the start of the freed block
    kept, faults, rss_kept = _faults('1')
    assert kept == 'True' and faults <= PAGES + 500
    assert rss_kept >= rss_returned + 50  # the freed 64 MB stayed with the process
    if not _huge_pages_always():  # 2 MiB pages fault 512 times less, whatever malloc does
        assert returned >= 4 * PAGES


def test_the_command_sets_it_and_import_does_not():
    code = ('import t2tvit, t2tvit.runtime as r; before = list(r._applied); from t2tvit.cli import main; '
            "main(['models']); print(before, r._applied)")
    out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == '[] [True]'
