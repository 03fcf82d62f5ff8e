"""bench/allocator.py: page faults are counted; glibc serves large blocks from its heap and keeps them once told."""

import json
import subprocess
import sys

SCRIPT = """
import ctypes, json, torch
from bench.allocator import keep_freed_memory, minor_faults

libc = ctypes.CDLL(None)
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]

def allocate():
    '''64 MiB written through: whether it came from the heap (below the program break), the break while it lived,
    and the page faults it took.'''
    f0 = minor_faults()
    x = torch.ones(16 << 20)
    from_heap, brk = x.data_ptr() < libc.sbrk(0), libc.sbrk(0)
    del x
    return from_heap, brk, minor_faults() - f0

from_heap_before, _, faults_before = allocate()
keep_freed_memory()
from_heap_after, brk_while_alive, _ = allocate()
print(json.dumps(dict(from_heap_before=from_heap_before, faults_before=faults_before, from_heap_after=from_heap_after,
                      heap_kept=libc.sbrk(0) >= brk_while_alive)))
"""


def test_large_blocks_come_from_the_heap_and_stay_there_once_glibc_keeps_freed_memory():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert not r["from_heap_before"] and r["faults_before"] >= (64 << 20) // 4096 // 2, r  # fresh mmap'd pages
    assert r["from_heap_after"] and r["heap_kept"], r
