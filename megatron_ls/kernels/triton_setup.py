"""Where the fused kernels can run and with which tile sizes.

Triton decides at decoration time whether a kernel is compiled or interpreted (TRITON_INTERPRET=1
runs it in NumPy on the CPU), so the kernel modules are imported lazily, on first use, after the
caller had the chance to set the variable.
"""

from __future__ import annotations

import os

import triton

from megatron_ls.kernels.availability import interpreting

# (BM, BN, num_warps, num_stages) per kernel. Chosen with `python -m megatron_ls.kernels.aot_check` (sm_90, bf16,
# dh 64): the position band of a tile (BM + BN distances) is a second score tile, so the FlashAttention-2 default
# of 64 x 64 with 4 warps spills (136 B/thread forward, 2.6 KB in dq). These candidates spill at most 144 B
# (dq 32 x 64), most of them not at all (BENCHMARKS.md).
_TILES = {
    "fwd": [(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 3), (16, 64, 4, 2)],
    "dq": [(32, 32, 8, 2), (16, 32, 4, 3), (32, 32, 4, 3), (32, 64, 8, 2)],
    "dkdv": [(64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 3), (32, 64, 4, 2)],
}


def configs(kernel: str) -> list[triton.Config]:
    """Autotune candidates of one kernel ("fwd", "dq" or "dkdv"): one small tile under the interpreter
    (every program runs in Python), the spill-free tiles of _TILES on CUDA.

    MEGATRON_LS_TRITON_CONFIG=i keeps only candidate i (read at import), also under the interpreter: tests
    run each CUDA tile's index arithmetic on the CPU, bench/gpu_check.sh checks each tile in turn on a GPU."""
    pick = os.environ.get("MEGATRON_LS_TRITON_CONFIG")
    if interpreting() and pick is None:
        return [triton.Config({"BM": 16, "BN": 16}, num_warps=1, num_stages=1)]
    out = [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in _TILES[kernel]]
    return out if pick is None else [out[min(int(pick), len(out) - 1)]]


def _ndw(args: dict) -> int:
    return triton.next_power_of_2(args["BM"] + args["BN"] - 1)


def _ndl(args: dict) -> int:
    """Landmark band rows: a power of two >= 16 (the band is a tl.dot operand, and the GPU's dot needs K >= 16)
    holding the distances of BN / r chunks; doubled until a tile can own at least half its block."""
    ndl = max(16, triton.next_power_of_2(triton.cdiv(args["BN"], args["R"])))
    while _owned(args, ndl) < max(1, args["BN"] // 2):
        ndl *= 2
    return ndl


def _owned(args: dict, ndl: int) -> int:
    # The distances chunk(i) - 1 - chunk(l) of BM queries and k landmarks take at most (BM-1)//c + (k-1)//r + 3
    # values (neither block need be chunk-aligned), so k = r (ndl - (BM-1)//c - 3) landmarks fit ndl rows.
    return min(args["BN"], args["R"] * (ndl - (args["BM"] - 1) // args["C"] - 3))


def _lstep(args: dict) -> int:
    return _owned(args, args["NDL"])


# Constexprs derived from the tile (Triton applies them in this order). NDW: the window distances of a tile,
# P + i - s over BM x BN, take BM + BN - 1 values, padded to a power of two (for tl.arange). NDL and LSTEP:
# each landmark tile loads a block of BN landmarks but owns only the first LSTEP of them, so that their
# distances fit NDL ~ BN / r rows: padding the band to twice its width would double its tl.dot.
BAND_SIZES = {"NDW": _ndw, "NDL": _ndl, "LSTEP": _lstep}
