"""Tiled long-short attention in pure PyTorch: the CPU default and the fallback everywhere.

Queries are processed in blocks of b positions, grouped so that one group's scores stay under `max_scores`
elements. A group's landmark scores and window-tile scores live in ONE buffer, row = [landmarks | tile], filled by
matmuls writing in place, with the relative-position terms added through strided views (the window band, the
landmark distance skew; attention/blocked_layout.py), one softmax over it, and two matmuls against the values.
Nothing is concatenated, copied or zero-filled at the size of the scores; only the masked corners of each tile and
of the landmark staircase are filled. The backward is written by hand (attention/blocked_core.py): it keeps the
probabilities (or, with `recompute`, rebuilds them per group) and nothing else of score size.

Memory is O(N (w + landmarks)) per head and no N x (M+N) matrix is formed.
"""

from __future__ import annotations

import contextlib

import torch

from megatron_ls.model.attention.blocked_core import BlockedCore
from megatron_ls.model.attention.blocked_layout import MAX_SCORES, default_block_size, make_geometry
from megatron_ls.model.attention.common import check_long_short_shapes

__all__ = ["long_short_attention_blocked", "default_block_size"]


def long_short_attention_blocked(
    q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, k_lm: torch.Tensor, v_lm: torch.Tensor,
    pos_bias_u: torch.Tensor, pos_bias_v: torch.Tensor, r_win: torch.Tensor, r_lm: torch.Tensor, *,
    window: int, chunk: int, chunk_rank: int, mem_len: int, dropout_p: float = 0.0,
    softmax_scale: float | None = None, block_size: int | None = None, max_scores: int = MAX_SCORES,
    recompute: bool = False,
) -> torch.Tensor:
    """See megatron_ls.model.attention for the contract. `block_size` (a multiple of `chunk`) and `max_scores` (score
    elements per group) tune the tiling; `recompute` keeps only the inputs and the output for the backward and
    rebuilds each group's probabilities there: O(N dh) saved instead of O(N (w + landmarks))."""
    check_long_short_shapes(q, k_win, v_win, k_lm, v_lm, pos_bias_u, pos_bias_v, r_win, r_lm,
                            window=window, chunk=chunk, chunk_rank=chunk_rank, mem_len=mem_len)
    if not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    tensors = (q, k_win, v_win, k_lm, v_lm, pos_bias_u, pos_bias_v, r_win, r_lm)
    device = q.device.type
    has_autocast = device in ("cpu", "cuda")  # not the meta device (bench/blocked_work.py)
    # Under autocast the matmuls run in the autocast dtype, as torch.matmul would; the softmax runs in fp32.
    if has_autocast and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = q.dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    tensors = tuple(t.to(dtype) for t in tensors)
    geo = make_geometry(tensors[0], k_lm.shape[2], r_lm.shape[1], window=window, chunk=chunk, chunk_rank=chunk_rank,
                        mem_len=mem_len, dropout_p=dropout_p, softmax_scale=softmax_scale, block_size=block_size,
                        max_scores=max_scores)
    with torch.autocast(device, enabled=False) if has_autocast else contextlib.nullcontext():
        return BlockedCore.apply(geo, recompute, *tensors)
