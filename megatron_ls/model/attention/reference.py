"""Dense long-short attention with an explicit mask: the O(N (M+N)) test oracle.

Every score a query could have is materialised, visibility is a boolean mask, and relative
positions are looked up by gathering; nothing is clever, so this is what the other
implementations are checked against. Small sizes only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_ls.model.attention.common import check_long_short_shapes, softmax_dtype


def long_short_attention_reference(
    q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, k_lm: torch.Tensor, v_lm: torch.Tensor,
    pos_bias_u: torch.Tensor, pos_bias_v: torch.Tensor, r_win: torch.Tensor, r_lm: torch.Tensor, *,
    window: int, chunk: int, chunk_rank: int, mem_len: int, dropout_p: float = 0.0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    P = check_long_short_shapes(q, k_win, v_win, k_lm, v_lm, pos_bias_u, pos_bias_v, r_win, r_lm,
                                window=window, chunk=chunk, chunk_rank=chunk_rank, mem_len=mem_len)
    B, H, N, dh = q.shape
    dev = q.device
    qs = q * (softmax_scale if softmax_scale is not None else dh ** -0.5)
    u = pos_bias_u[None, :, None, :]
    v = pos_bias_v[None, :, None, :]

    # Window: query i sits at key index P + i; distance d = P + i - s must lie in [0, window).
    i = torch.arange(N, device=dev)[:, None]
    s = torch.arange(P + N, device=dev)[None, :]
    d_win = P + i - s
    win_visible = (d_win >= 0) & (d_win < window)
    pos_win = torch.matmul(qs + v, r_win.transpose(-1, -2))  # (B, H, N, window)
    pos_win = pos_win.gather(-1, d_win.clamp(0, window - 1).expand(B, H, N, P + N))
    scores_win = torch.matmul(qs + u, k_win.transpose(-1, -2)) + pos_win

    n_lm = k_lm.shape[2]
    if n_lm:
        # Landmark column l belongs to chunk l // r of [memory; segment]; query i to chunk (M + i) // c.
        q_chunk = (mem_len + torch.arange(N, device=dev)[:, None]) // chunk
        lm_chunk = torch.arange(n_lm, device=dev)[None, :] // chunk_rank
        d_lm = q_chunk - 1 - lm_chunk
        lm_visible = d_lm >= 0
        pos_lm = torch.matmul(qs, r_lm.transpose(-1, -2))  # (B, H, N, n_dist)
        pos_lm = pos_lm.gather(-1, d_lm.clamp(0, r_lm.shape[1] - 1).expand(B, H, N, n_lm))
        scores_lm = torch.matmul(qs, k_lm.transpose(-1, -2)) + pos_lm
        scores = torch.cat([scores_lm, scores_win], dim=-1)
        visible = torch.cat([lm_visible, win_visible], dim=-1)
    else:
        scores, visible = scores_win, win_visible

    probs = F.softmax(scores.to(softmax_dtype(scores.dtype)).masked_fill(~visible, float("-inf")), dim=-1).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.matmul(probs[..., n_lm:], v_win)
    if n_lm:
        out = out + torch.matmul(probs[..., :n_lm], v_lm)
    return out
