"""The CPU allocator's share of a step: page faults, and glibc told to keep what it frees.

torch's CPU tensors come from the C library's malloc. glibc serves large blocks (above a threshold it moves up to
32 MiB) with fresh mmap'd pages and gives them back on free, so every step that allocates them again pays a page
fault per 4 KiB page, and the kernel zeroes each one. A layer that allocates GB-sized score tensors per step spends
much of its time there. PyTorch's GPU allocator caches; on the CPU, jemalloc or tcmalloc (LD_PRELOAD) or the
setting below does the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def minor_faults() -> int:
    """Page faults this process has taken so far that needed no disk (fresh or reclaimed pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def keep_freed_memory() -> None:
    """From now on glibc serves every block from its heap (no mmap) and never returns freed memory to the system:
    the same as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large> at process start. Blocks already allocated keep
    where they are, and a loop that allocates the same sizes every step stops faulting after a few steps
    (bench/attention.py: the LM from ~60k page faults per step to none, the official layer from ~600k to under
    20k). Raises RuntimeError where the C library has no mallopt (not glibc)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        raise RuntimeError("this C library has no mallopt (glibc's); use jemalloc or tcmalloc through LD_PRELOAD")
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        raise RuntimeError("glibc refused mallopt(M_MMAP_MAX, 0) or mallopt(M_TRIM_THRESHOLD, 2^31 - 1)")
