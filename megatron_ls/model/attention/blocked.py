"""Tiled long-short attention in pure PyTorch: the CPU default and the fallback everywhere.

Queries are cut into blocks of `b` rows. A block needs the window keys of only b + w - 1
consecutive positions, which `unfold` exposes as a strided view (no copy, no N x (M+N) scores).
The window's relative-position term is computed once per query against the w distances and
moved into key order by the Transformer-XL "skew" (pad, flatten, re-view); padding the skew
with a large negative number masks the band outside the window for free. Landmark scores are
one matmul of the queries against all landmarks visible to the group, their distance term a
gather whose out-of-range index points at a large negative column (the chunk-causal mask).
Both parts go through ONE softmax.

Memory is O(N (b + w + landmarks)) per head. Queries are processed in groups so the score
tensor of one group stays under `max_scores` elements; each group sees only the landmarks of
chunks before its last query's chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_ls.model.attention.common import check_long_short_shapes, neg_value, softmax_dtype


def default_block_size(window: int, seq_len: int) -> int:
    # b = w/2 wastes a third of the window scores instead of half at b = w, while blocks stay
    # large enough for efficient matmuls; measured best on CPU (bench/attention.py).
    b = window // 2 if window >= 64 else window
    return max(1, min(b, seq_len))


def long_short_attention_blocked(
    q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, k_lm: torch.Tensor, v_lm: torch.Tensor,
    pos_bias_u: torch.Tensor, pos_bias_v: torch.Tensor, r_win: torch.Tensor, r_lm: torch.Tensor, *,
    window: int, chunk: int, chunk_rank: int, mem_len: int, dropout_p: float = 0.0,
    softmax_scale: float | None = None, block_size: int | None = None, max_scores: int = 1 << 26,
) -> torch.Tensor:
    P = check_long_short_shapes(q, k_win, v_win, k_lm, v_lm, pos_bias_u, pos_bias_v, r_win, r_lm,
                                window=window, chunk=chunk, chunk_rank=chunk_rank, mem_len=mem_len)
    B, H, N, dh = q.shape
    w = window
    b = block_size or default_block_size(w, N)
    n_blocks = math.ceil(N / b)
    n_pad = n_blocks * b - N
    L = b + w - 1  # keys one query block can see
    neg = neg_value(q.dtype)

    qs = q * (softmax_scale if softmax_scale is not None else dh ** -0.5)
    qs = F.pad(qs, (0, 0, 0, n_pad))
    qu = qs + pos_bias_u[None, :, None, :]
    qv = qs + pos_bias_v[None, :, None, :]
    # Key index (w - 1) + i holds query i's own position; `front` pad rows stand for positions
    # before the stream start and are masked below.
    front = w - 1 - P
    kp = F.pad(k_win, (0, 0, front, n_pad))
    vp = F.pad(v_win, (0, 0, front, n_pad))
    r_win_rev = r_win.flip(1).transpose(1, 2)  # column j = distance w - 1 - j

    n_lm = k_lm.shape[2]
    r_lm_t = r_lm.transpose(1, 2) if n_lm else None
    # Group size in blocks: bound the joint score tensor of one group.
    per_block = B * H * b * (L + n_lm)
    group = max(1, min(n_blocks, max_scores // max(per_block, 1)))

    outs = []
    for g0 in range(0, n_blocks, group):
        g1 = min(n_blocks, g0 + group)
        rows = slice(g0 * b, g1 * b)
        nb = g1 - g0
        # ---- window scores: content (q + u).k plus the skewed position term (q + v).R_w(d).
        k_tiles = kp[:, :, g0 * b: g1 * b + w - 1].unfold(2, L, b)  # (B, H, nb, dh, L)
        v_tiles = vp[:, :, g0 * b: g1 * b + w - 1].unfold(2, L, b).transpose(-1, -2)
        s_win = torch.matmul(qu[:, :, rows].reshape(B, H, nb, b, dh), k_tiles)
        pos = torch.matmul(qv[:, :, rows], r_win_rev)  # (B, H, nb*b, w), column j = distance w-1-j
        if g0 * b < front:  # distances reaching before the stream start
            i = torch.arange(g0 * b, g1 * b, device=q.device)[:, None]
            j = torch.arange(w, device=q.device)[None, :]
            pos = pos.masked_fill(j < front - i, neg)
        # Skew: row i of block becomes [i zeros-of-neg, its w distance columns, neg ...] over L keys.
        pos = F.pad(pos.view(B, H, nb, b, w), (0, b), value=neg).flatten(-2)[..., : b * L]
        s_win = s_win + pos.view(B, H, nb, b, L)

        # ---- landmark scores: q.k_lm + q.R_c(d), d = chunk(t) - 1 - chunk(landmark), clamped.
        last_q = min(g1 * b, N) - 1
        n_vis = (mem_len + last_q) // chunk * chunk_rank if n_lm else 0
        if n_vis:
            qg = qs[:, :, rows]
            s_lm = torch.matmul(qg, k_lm[:, :, :n_vis].transpose(-1, -2))
            pos_lm = F.pad(torch.matmul(qg, r_lm_t), (0, 1), value=neg)  # last column: invisible
            n_dist = r_lm.shape[1]
            q_chunk = (mem_len + torch.arange(g0 * b, g1 * b, device=q.device)[:, None]) // chunk
            d = q_chunk - 1 - torch.arange(n_vis, device=q.device)[None, :] // chunk_rank
            idx = torch.where(d >= 0, d.clamp(max=n_dist - 1), n_dist)
            s_lm = s_lm + pos_lm.gather(-1, idx.expand(B, H, nb * b, n_vis))
            scores = torch.cat([s_lm.view(B, H, nb, b, n_vis), s_win], dim=-1)
        else:
            scores = s_win

        probs = F.softmax(scores.to(softmax_dtype(scores.dtype)), dim=-1).to(q.dtype)
        if dropout_p > 0:
            probs = F.dropout(probs, p=dropout_p)
        if n_vis:
            # One matmul against [landmark values ; window values] per block: slicing probs
            # instead would cost two full-size zero-fills in the backward.
            v_lm_tiles = v_lm[:, :, None, :n_vis].expand(B, H, nb, n_vis, dh)
            v_tiles = torch.cat([v_lm_tiles, v_tiles], dim=-2)
        out = torch.matmul(probs, v_tiles).view(B, H, nb * b, dh)
        outs.append(out)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out[:, :, :N]
