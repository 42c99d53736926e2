"""Process settings the command line applies before it builds a model.

On CPU, an eager forward pass of ``t2t_vit_14`` at batch 32 allocates a few hundred megabytes of short-lived
tensors. glibc's ``malloc`` hands each block above its mmap threshold back to the kernel when it is freed, so
the next step maps it again and takes one page fault per 4 KiB: about 80,000 faults and 10-20% of a bf16 or
float32 inference step on a 2-core VM (benchmarks/RESULTS_low_precision.md). PyTorch's CPU tuning guide
suggests jemalloc or tcmalloc for this; ``keep_freed_memory`` gets the same from glibc itself with
``mallopt``: large blocks come from the heap and freed memory stays with the process, so after the first
step a step maps nothing. The process keeps its peak memory until it exits (its peak is unchanged).

It changes a process-wide setting, so ``import t2tvit`` never calls it; the ``t2tvit`` command does, unless
``T2TVIT_KEEP_FREED_MEMORY=0``.
"""
import ctypes
import os
import platform

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

ENV = 'T2TVIT_KEEP_FREED_MEMORY'
_applied = []


def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from the heap and keep freed memory; True when it is in effect.

    Does nothing (False) off Linux/glibc or with ``T2TVIT_KEEP_FREED_MEMORY=0``. Idempotent.
    """
    if _applied:
        return _applied[0]
    ok = False
    if os.environ.get(ENV, '1') != '0' and platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc':
        try:
            libc = ctypes.CDLL('libc.so.6')
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # a C int: larger values would wrap silently
            # 1 GiB: every tensor of a step below it comes from the heap; the largest int: the heap is not trimmed
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
            libc.mallopt(_M_TOP_PAD, 64 << 20)
        except (OSError, AttributeError):
            ok = False
    _applied.append(ok)
    return ok
