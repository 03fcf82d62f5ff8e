"""Where the fused kernels can run and with which tile sizes.

Triton decides at decoration time whether a kernel is compiled or interpreted (TRITON_INTERPRET=1
runs it in NumPy on the CPU), so the kernel modules are imported lazily, on first use, after the
caller had the chance to set the variable.
"""

from __future__ import annotations

import os

import triton

from megatron_ls.kernels.availability import interpreting


def configs(bwd: bool = False) -> list[triton.Config]:
    """Autotune candidates: one small tile under the interpreter (every program runs in Python),
    a few FlashAttention-2-like tiles on CUDA. BM/BN beyond 64 make the position band (BM + BN
    distances, padded to a power of two) too large for registers.

    MEGATRON_LS_TRITON_CONFIG=i keeps only candidate i (read at import): tests compile one tile
    per geometry instead of autotuning every one, and bench/gpu_check.sh checks each tile in turn."""
    if interpreting():
        return [triton.Config({"BM": 16, "BN": 16}, num_warps=1, num_stages=1)]
    out = [triton.Config({"BM": 64, "BN": 64}, num_warps=4, num_stages=2),
           triton.Config({"BM": 64, "BN": 32}, num_warps=4, num_stages=3),
           triton.Config({"BM": 32, "BN": 64}, num_warps=4, num_stages=2)]
    if not bwd:
        out.append(triton.Config({"BM": 128, "BN": 32}, num_warps=8, num_stages=2))
    pick = os.environ.get("MEGATRON_LS_TRITON_CONFIG")
    return out if pick is None else [out[min(int(pick), len(out) - 1)]]


def _ndw(args: dict) -> int:
    return triton.next_power_of_2(args["BM"] + args["BN"] - 1)


def _ndl(args: dict) -> int:
    return triton.next_power_of_2((args["BM"] - 1) // args["C"] + (args["BN"] - 1) // args["R"] + 3)


# Distances one (BM x BN) tile spans, padded to a power of two (constexpr for tl.arange). Window:
# P + i - s takes BM + BN - 1 values. Landmarks: chunk(i) - 1 - chunk(l) takes at most
# (BM-1)//c + (BN-1)//r + 2 values (+1 when a block is not chunk-aligned).
BAND_SIZES = {"NDW": _ndw, "NDL": _ndl}
