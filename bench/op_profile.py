"""Where a forward+backward spends its CPU time, by operator (torch.profiler self time).

The "moving memory" share is what issue 15 asks to keep small: concatenation, copies, fills (zero_, fill_,
masked_fill_) and elementwise additions and subtractions, against everything else (matmuls, softmax, ...).
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile

MOVING = ("aten::cat", "aten::copy_", "aten::fill_", "aten::zero_", "aten::masked_fill_", "aten::add", "aten::add_",
          "aten::sub", "aten::sub_")
MATMUL = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::baddbmm_", "aten::matmul")


def op_shares(step: Callable[[], None], top: int = 15) -> dict:
    """Profile one call of `step`; returns the total self time (ms), the top operators and the group shares."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = [dict(op=e.key, ms=e.self_cpu_time_total / 1e3, share=e.self_cpu_time_total / total, calls=e.count)
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]]
    moving = sum(e.self_cpu_time_total for e in events if e.key in MOVING)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL)
    return dict(total_ms=total / 1e3, ops=rows, moving_share=moving / total, matmul_share=matmul / total)


def print_shares(title: str, shares: dict) -> None:
    print(f"\n{title}: {shares['total_ms']:.0f} ms self CPU time")
    print(f"{'op':<32} {'ms':>9} {'share':>7} {'calls':>7}")
    for r in shares["ops"]:
        print(f"{r['op']:<32} {r['ms']:>9.1f} {r['share']:>7.1%} {r['calls']:>7}")
    print(f"cat + copy + fill + elementwise add/sub: {shares['moving_share']:.1%}; "
          f"matmuls (mm, bmm, addmm, baddbmm): {shares['matmul_share']:.1%}")
