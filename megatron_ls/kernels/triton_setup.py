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
# of 64 x 64 with 4 warps spills (136 B/thread forward, 2.6 KB in dq). These candidates spill at most 104 B.
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
    # At least 16: the band is a tl.dot operand (dq: dS_band @ R_band), and the GPU's dot needs K >= 16.
    return max(16, triton.next_power_of_2((args["BM"] - 1) // args["C"] + (args["BN"] - 1) // args["R"] + 3))


# Distances one (BM x BN) tile spans, padded to a power of two (constexpr for tl.arange). Window:
# P + i - s takes BM + BN - 1 values. Landmarks: chunk(i) - 1 - chunk(l) takes at most
# (BM-1)//c + (BN-1)//r + 2 values (+1 when a block is not chunk-aligned).
BAND_SIZES = {"NDW": _ndw, "NDL": _ndl}
