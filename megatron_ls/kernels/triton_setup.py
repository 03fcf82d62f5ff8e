"""Where the fused kernels can run and with which tile sizes.

Triton decides at decoration time whether a kernel is compiled or interpreted (TRITON_INTERPRET=1
runs it in NumPy on the CPU), so the kernel modules are imported lazily, on first use, after the
caller had the chance to set the variable.
"""

from __future__ import annotations

import os

import triton

from megatron_ls.kernels.availability import interpreting

# (BM, BN, num_warps, num_stages) per kernel: BM queries, BN keys (or landmarks). 64 x 64 everywhere: every product
# of every kernel then runs on Hopper's wgmma (64 rows per warpgroup, >= 4 warps), the sm_90 compile spills nothing
# in the default window-position mode (table; `python -m megatron_ls.kernels.aot_check`, bf16, dh 64), and the
# issued work stays within 1.2x of the floor (bench/kernel_work.py). Larger tiles spill (the position band is a
# second score tile) or, for BM = 128, add a quarter of masked window work (1 + BM / w).
_TILES = {
    "fwd": [(64, 64, 8, 2), (64, 64, 8, 3), (64, 64, 4, 2)],
    "bwd_window": [(64, 64, 8, 2), (64, 64, 8, 3)],
    "bwd_landmark": [(64, 64, 8, 2), (64, 64, 8, 3)],  # with 4 warps it spills 8 B
}


def configs(kernel: str) -> list[triton.Config]:
    """Autotune candidates of one kernel (a key of _TILES): one small tile under the interpreter
    (every program runs in Python), the tiles of _TILES on CUDA.

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


def _query_chunk_span(bm: int, c: int) -> int:
    """How many chunk boundaries BM consecutive queries can cross. Query blocks start at multiples of BM and
    the memory length is a multiple of c, so when one of BM, c divides the other a block never straddles more
    than (BM-1)//c boundaries; otherwise a block can start anywhere in a chunk."""
    return (bm - 1) // c if bm % c == 0 or c % bm == 0 else (bm + c - 2) // c


def _owned(args: dict, ndl: int) -> int:
    # A tile owning k landmarks from l0 (a multiple of r when k is) spans k / r landmark chunks and the query
    # chunks of its block: their distances chunk(i) - 1 - chunk(l) take span + k / r values, so that k fits ndl
    # rows when k = r (ndl - span), a multiple of r.
    r, bn, span = args["R"], args["BN"], _query_chunk_span(args["BM"], args["C"])
    if r > bn:  # a block holds landmarks of at most two chunks
        return bn if ndl >= span + 2 else 0
    return min(bn // r * r, r * (ndl - span))


def _lstep(args: dict) -> int:
    return _owned(args, args["NDL"])


# Constexprs derived from the tile (Triton applies them in this order). NDW: the window distances of a tile,
# P + i - s over BM x BN, take BM + BN - 1 values, padded to a power of two (for tl.arange). NDL and LSTEP:
# each landmark tile loads a block of BN landmarks but owns only the first LSTEP of them, so that their
# distances fit NDL ~ BN / r rows: padding the band to twice its width would double its tl.dot.
WINDOW_BAND = {"NDW": _ndw}
LANDMARK_BAND = {"NDL": _ndl, "LSTEP": _lstep}
BAND_SIZES = {**WINDOW_BAND, **LANDMARK_BAND}
