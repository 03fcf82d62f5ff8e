"""The one-layer LM's time outside its attention core: the same step with a blocked core that costs nothing.

Under `free_core()` the blocked core returns its queries as its output and, in the backward, passes the output's
gradient to the queries and zeros to its other inputs. Every projection, norm, landmark compression, MLP and the
loss still run forward and backward at the same shapes, so the step's time is the LM without the core: what any
core, however fast, adds its own time to. bench/attention.py times it alternately with the real LM and the
official layer, which turns issue 15's target ratio into a time budget for the core. Not a model: a measurement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

import megatron_ls.model.attention.blocked as blocked


class FreeCore(torch.autograd.Function):
    """BlockedCore's signature, (geometry, recompute, q, k_win, v_win, k_lm, v_lm, u, v, r_win, r_lm) -> q's copy."""

    @staticmethod
    def forward(ctx, geo, recompute, q, *others):
        ctx.shapes = [t.shape for t in others]
        return q.clone()

    @staticmethod
    def backward(ctx, dout):
        return (None, None, dout) + tuple(dout.new_zeros(shape) for shape in ctx.shapes)


@contextlib.contextmanager
def free_core() -> Iterator[None]:
    """Within: every blocked long-short core is FreeCore; after: the real one again."""
    real = blocked.BlockedCore
    blocked.BlockedCore = FreeCore
    try:
        yield
    finally:
        blocked.BlockedCore = real
