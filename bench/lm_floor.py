"""The fewest seconds the one-layer LM's forward+backward can take on this machine, whatever the attention code.

Its matrix products are counted op by op (bench/blocked_work.py's counter, in-place products included) over one
real step; the blocked core's own products are replaced by the core's floor (9 products x 2 dh FLOPs per visible
pair: a core that keeps its probabilities, as the blocked one does); everything that is not a product (norms,
softmax, GELU, the loss, memory traffic) is counted as free. Divided by this machine's fp32 matmul rate, measured
in the same run (the best of several 2048^3 products), that is a lower bound on the LM's time, and so on the ratio
to the official layer that issue 15 asks about.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bench.blocked_work import ByteCounter, account, floor_flops

# Per visible pair, a core that keeps its probabilities: q.k, q.R, P.v forward; dP, dV, dQ (from dS and from dA),
# dK, dR backward; nothing rebuilt.
CORE_PRODUCTS_KEPT_PROBS = 9


def matmul_rate(dtype: torch.dtype = torch.float32, size: int = 2048, repeat: int = 10) -> float:
    """The best FLOP/s of `repeat` size^3 CPU products: the machine's practical matmul peak at this moment."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def product_flops(step: Callable[[], None]) -> int:
    """Matrix-product FLOPs of one call of `step` (forward and backward)."""
    counter = ByteCounter()
    with counter:
        step()
    return sum(f for _, _, f in counter.ops)


def lm_floor(step: Callable[[], None], *, n: int, m: int, hidden: int, heads: int, window: int, chunk: int,
             rank: int) -> dict:
    """The LM's products with its core at the floor, this machine's matmul rate, and the least time they take."""
    dh = hidden // heads
    counted = product_flops(step)
    core = account(1, n, m, torch.float32, H=heads, dh=dh, w=window, c=chunk, r=rank)["blocked_matmul_flops"]
    core_floor = floor_flops(1, heads, n, m, dh, window, chunk, rank, products=CORE_PRODUCTS_KEPT_PROBS)
    outside = counted - core
    rate = matmul_rate()
    return dict(product_flops=counted, core_flops=core, outside_core_flops=outside, core_floor_flops=core_floor,
                matmul_flops_per_s=rate, floor_ms=1e3 * (outside + core_floor) / rate,
                outside_core_ms=1e3 * outside / rate)
