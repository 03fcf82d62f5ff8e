"""Work account of the blocked long-short core, and what it means on a V100 against the fused kernels.

    python bench/blocked_work.py                          # the paper's three phases: N = M = 2K, 4K, 8K, B = 1
    python bench/blocked_work.py --sizes 8192 --batch 4 --mem-ratio 0

Runs megatron_ls.model.attention.long_short_attention_blocked forward + backward on PyTorch's meta device (shapes
only, nothing computed) at the presets' geometry (D 512, 8 heads, dh 64, w 512, c 16, r 1) and counts, op by op:
- FLOPs of the matrix products (torch.utils.flop_counter: mm / bmm / baddbmm, backward included), which cuBLAS runs
  on fp16 tensor cores;
- bytes each op reads and writes (every tensor argument and result that is not a view: an HBM-traffic model that
  ignores cache reuse between ops).
The floor is the issue's: every visible (query, key-or-landmark) pair costs 2 dh FLOPs for each of 10 products.

V100 SXM2 32 GB figures used: 125 TFLOP/s fp16 tensor cores, 15.7 TFLOP/s fp32 FMA, 900 GB/s HBM2. The blocked time
bound is the sum over ops of max(FLOPs / 125 T, bytes / 900 G); the fused bound is the floor's FLOPs on fp32 FMAs
(Triton compiles tl.dot to FMA below sm_80, see docs/V100.md) at peak, with no spill and nothing else: both are lower
bounds, the fused one the more optimistic. Writes JSON (bench/results/blocked_work.json or --output).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.results_json import write_json  # noqa: E402
from megatron_ls.model.attention import long_short_attention_blocked  # noqa: E402

V100 = {"tensor_fp16": 125e12, "fma_fp32": 15.7e12, "hbm": 900e9}
_VIEWS = {"view", "_unsafe_view", "permute", "transpose", "t", "expand", "slice", "select", "unsqueeze", "squeeze",
          "as_strided", "alias", "split", "split_with_sizes", "unbind", "detach", "_reshape_alias", "flatten",
          "reshape", "unflatten", "narrow", "chunk", "lift_fresh", "clone_meta", "numpy_T"}


class ByteCounter(TorchDispatchMode):
    """Per op (not views): bytes of every tensor read and written, and the op's matmul FLOPs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int, int]] = []  # (name, bytes, flops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _VIEWS:
            return out
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        # In-place products (the blocked core writes its scores with baddbmm_) cost what their out-of-place twin does.
        formula = flop_registry.get(func.overloadpacket) or flop_registry.get(
            getattr(torch.ops.aten, name.rstrip("_"), None))
        flops = formula(*args, **(kwargs or {}), out_val=out) if formula else 0
        self.ops.append((name, nbytes, int(flops)))
        return out


def floor_flops(B: int, H: int, N: int, M: int, dh: int, w: int, c: int, r: int, products: int = 10) -> int:
    """`products` x 2 dh FLOPs per visible (query, window key or landmark) pair: 10 is the issue's floor for the
    fused kernels; a core that keeps its probabilities needs 9 (bench/lm_floor.py)."""
    pairs = 0
    for i in range(N):
        t = M + i
        pairs += min(w, t + 1) + t // c * r
    return products * 2 * dh * pairs * B * H


def core_inputs(B: int, N: int, M: int, dtype: torch.dtype, device: torch.device, H: int, dh: int, w: int, c: int,
                r: int) -> tuple[torch.Tensor, ...]:
    """Trainable inputs of long_short_attention_blocked at this geometry (random; uninitialised on meta):
    q, window k / v, landmark k / v, u, v, R_w, R_c."""
    P = min(M, w - 1)
    n_lm = (M + N) // c * r

    def t(*shape):
        return torch.randn(shape, device=device, dtype=dtype, requires_grad=True)

    return (t(B, H, N, dh), t(B, H, P + N, dh), t(B, H, P + N, dh), t(B, H, n_lm, dh), t(B, H, n_lm, dh),
            t(H, dh), t(H, dh), t(H, w, dh), t(H, max((M + N) // c - 1, 1), dh))


def account(B: int, N: int, M: int, dtype: torch.dtype, H: int = 8, dh: int = 64, w: int = 512, c: int = 16,
            r: int = 1) -> dict:
    args = core_inputs(B, N, M, dtype, torch.device("meta"), H, dh, w, c, r)
    counter = ByteCounter()
    with counter:
        out = long_short_attention_blocked(*args, window=w, chunk=c, chunk_rank=r, mem_len=M)
        out.backward(torch.empty_like(out))
    matmul = sum(f for _, _, f in counter.ops)
    nbytes = sum(b for _, b, _ in counter.ops)
    bound = sum(max(f / V100["tensor_fp16"], b / V100["hbm"]) for _, b, f in counter.ops)
    floor = floor_flops(B, H, N, M, dh, w, c, r)
    return {"B": B, "N": N, "M": M, "dtype": str(dtype).removeprefix("torch."), "ops": len(counter.ops),
            "blocked_matmul_flops": matmul, "blocked_bytes": nbytes, "floor_flops": floor,
            "blocked_flops_over_floor": matmul / floor, "blocked_v100_bound_ms": bound * 1e3,
            "fused_fma_floor_bound_ms": floor / V100["fma_fp32"] * 1e3}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2048,4096,8192", help="segment lengths N")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mem-ratio", type=float, default=1.0, help="memory M = ratio x N")
    p.add_argument("--output")
    a = p.parse_args()
    out = a.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "blocked_work.json")
    rows: list[dict] = []
    result = {"v100": V100, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows}
    print(f"{'N':>6} {'M':>6} {'B':>2} {'floor GFLOP':>12} {'blocked GFLOP':>14} {'x floor':>8} {'blocked GB':>11} "
          f"{'blocked V100 >= ms':>19} {'fused FMA >= ms':>16}")
    for n in (int(s) for s in a.sizes.split(",")):
        m = int(n * a.mem_ratio) // 16 * 16
        row = account(a.batch, n, m, torch.float16)
        rows.append(row)
        write_json(out, result)
        print(f"{n:>6} {m:>6} {a.batch:>2} {row['floor_flops'] / 1e9:>12.1f} "
              f"{row['blocked_matmul_flops'] / 1e9:>14.1f} {row['blocked_flops_over_floor']:>8.2f} "
              f"{row['blocked_bytes'] / 1e9:>11.2f} "
              f"{row['blocked_v100_bound_ms']:>19.2f} {row['fused_fma_floor_bound_ms']:>16.2f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
