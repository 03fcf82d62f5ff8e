"""Tiled long-short attention in pure PyTorch: the CPU default and the fallback everywhere.

Queries and window keys are cut into blocks of `b` positions and laid out block-major,
(blocks, B, H, b, dh), so that "the key block s places before each query block" is a
contiguous slice: the window scores of all query blocks against one key-block offset are one
batched matmul with no copy, and a query block needs only the ceil(w/b) + 1 key blocks ending
at its own. The window's relative-position term is computed once per query against the w
distances and moved into key order by the Transformer-XL "skew" (pad, flatten, re-view);
padding the skew with a large negative number masks everything outside the band for free.
Landmark scores are one matmul of a group of queries against the landmarks visible to the
group, their distance term a gather whose out-of-range index points at a large negative
column (the chunk-causal mask). Both parts go through ONE softmax.

Memory is O(N (b + w + landmarks)) per head and no N x (M+N) matrix is formed. Queries are
processed in groups so that the score tensor of one group stays under `max_scores` elements
(cache-friendly on CPU, bounded on GPU); a group sees only the landmarks of chunks before
its last query's chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_ls.model.attention.common import check_long_short_shapes, neg_value, softmax_dtype


def default_block_size(window: int, seq_len: int) -> int:
    # b = w/4 makes the window scores 1.25 w wide per query instead of 2 w at b = w, with blocks
    # still big enough for efficient matmuls; measured best on CPU at w = 512 (bench/attention.py).
    b = window // 4 if window >= 256 else window // 2 if window >= 64 else window
    return max(1, min(b, seq_len))


def _block_major(x: torch.Tensor, b: int) -> torch.Tensor:
    """(B, H, n*b, dh) -> (n, B, H, b, dh), contiguous."""
    B, H, L, dh = x.shape
    return x.view(B, H, L // b, b, dh).permute(2, 0, 1, 3, 4).contiguous()


def long_short_attention_blocked(
    q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, k_lm: torch.Tensor, v_lm: torch.Tensor,
    pos_bias_u: torch.Tensor, pos_bias_v: torch.Tensor, r_win: torch.Tensor, r_lm: torch.Tensor, *,
    window: int, chunk: int, chunk_rank: int, mem_len: int, dropout_p: float = 0.0,
    softmax_scale: float | None = None, block_size: int | None = None, max_scores: int = 1 << 23,
    recompute: bool = False,
) -> torch.Tensor:
    """See megatron_ls.model.attention for the contract. `recompute` keeps only each query group's inputs for the
    backward and rebuilds its scores there: O(N dh) saved instead of O(N (w + landmarks)), for ~1.3x the time."""
    P = check_long_short_shapes(q, k_win, v_win, k_lm, v_lm, pos_bias_u, pos_bias_v, r_win, r_lm,
                                window=window, chunk=chunk, chunk_rank=chunk_rank, mem_len=mem_len)
    B, H, N, dh = q.shape
    w = window
    b = block_size or default_block_size(w, N)
    n_blocks = math.ceil(N / b)
    n_pad = n_blocks * b - N
    shifts = math.ceil(w / b)  # key blocks strictly before a query block that its window can reach
    W = shifts * b  # distances covered by those blocks (>= w; the excess is masked)
    L = W + b  # window keys per query block
    neg = neg_value(q.dtype)

    qs = q * (softmax_scale if softmax_scale is not None else dh ** -0.5)
    qs = _block_major(F.pad(qs, (0, 0, 0, n_pad)), b)  # (n_blocks, B, H, b, dh)
    qu = qs + pos_bias_u[:, None, :]
    qv = qs + pos_bias_v[:, None, :]
    # Key block s + shifts holds the own positions of query block s; the `front` padding stands
    # for positions before the stream start and is masked through the position term below.
    front = W - P
    kb = _block_major(F.pad(k_win, (0, 0, front, n_pad)), b)
    vb = _block_major(F.pad(v_win, (0, 0, front, n_pad)), b)
    r_win_rev = r_win.flip(1).transpose(1, 2)  # column j = distance w - 1 - j
    first_masked = w - 1 - P  # rows i < first_masked reach before the stream start

    n_lm = k_lm.shape[2]
    r_lm_t = r_lm.transpose(1, 2) if n_lm else None
    per_block = B * H * b * (L + n_lm)
    group = max(1, min(n_blocks, max_scores // max(per_block, 1)))

    # Per-group pieces come from split(), never from slicing in the loop: the backward of a
    # slice zero-fills the whole source tensor, once per slice; split's is one concatenation.
    qu_g = qu.split(group, dim=0)
    qv_g = qv.split(group, dim=0)
    qs_g = qs.split(group, dim=0)
    # Key blocks s places after the first one each query block needs, grouped like the queries.
    k_sh = [kb[s: s + n_blocks].split(group, dim=0) for s in range(shifts + 1)]
    v_sh = [vb[s: s + n_blocks].split(group, dim=0) for s in range(shifts + 1)]

    geometry = _Geometry(B=B, H=H, N=N, dh=dh, w=w, b=b, W=W, L=L, chunk=chunk, chunk_rank=chunk_rank,
                         mem_len=mem_len, first_masked=first_masked, neg=neg, dropout_p=dropout_p, dtype=q.dtype)
    outs = []
    for gi, g0 in enumerate(range(0, n_blocks, group)):
        g1 = min(n_blocks, g0 + group)
        args = (qu_g[gi], qv_g[gi], qs_g[gi], r_win_rev, k_lm, v_lm, r_lm_t, *[k[gi] for k in k_sh],
                *[v[gi] for v in v_sh])
        if recompute and torch.is_grad_enabled():
            # Save the group's inputs only; its scores and probabilities are rebuilt in the backward (same
            # dropout mask: the checkpoint restores the RNG state the forward saw).
            outs.append(checkpoint(_group_output, geometry, g0, g1, *args, use_reentrant=False))
        else:
            outs.append(_group_output(geometry, g0, g1, *args))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    return out.permute(1, 2, 0, 3, 4).reshape(B, H, n_blocks * b, dh)[:, :, :N]


@dataclass(frozen=True)
class _Geometry:
    B: int
    H: int
    N: int
    dh: int
    w: int
    b: int
    W: int
    L: int
    chunk: int
    chunk_rank: int
    mem_len: int
    first_masked: int
    neg: float
    dropout_p: float
    dtype: torch.dtype


def _group_output(g: _Geometry, g0: int, g1: int, qu: torch.Tensor, qv: torch.Tensor, qs: torch.Tensor,
                  r_win_rev: torch.Tensor, k_lm: torch.Tensor, v_lm: torch.Tensor, r_lm_t: torch.Tensor | None,
                  *kv_blocks: torch.Tensor) -> torch.Tensor:
    """Attention output (nb, B, H, b, dh) of query blocks g0..g1-1; kv_blocks: the shifts + 1 key blocks, then
    the shifts + 1 value blocks, each (nb, B, H, b, dh)."""
    B, H, b, dh, w, W, L, neg = g.B, g.H, g.b, g.dh, g.w, g.W, g.L, g.neg
    nb, dev = g1 - g0, qu.device
    k_blocks, v_blocks = kv_blocks[: len(kv_blocks) // 2], kv_blocks[len(kv_blocks) // 2:]
    # ---- window position term (q + v).R_w(d), skewed into key order, band mask included.
    pos = torch.matmul(qv, r_win_rev)  # (nb, B, H, b, w)
    if g0 * b < g.first_masked:
        i = torch.arange(g0 * b, g1 * b, device=dev).view(nb, 1, 1, b, 1)
        pos = pos.masked_fill(torch.arange(w, device=dev) < g.first_masked - i, neg)
    # Column j' of the padded row is distance W - j'; key jj of the block's L keys is at
    # distance W + ii - jj, so row ii must start ii + 1 columns to the left: pad, flatten, re-view.
    pos = F.pad(pos, (W - w + 1, b), value=neg).flatten(-2)[..., : b * L].view(nb * B * H, b, L)

    # ---- window content (q + u).k against the L keys of each query block: a tile of the
    # shifts + 1 key blocks it needs (a small copy: L x dh per block, less than its scores).
    k_tiles = torch.cat(k_blocks, dim=-2).view(nb * B * H, L, dh)
    s_win = torch.baddbmm(pos, qu.view(nb * B * H, b, dh), k_tiles.transpose(1, 2))
    v_tiles = [v.view(nb * B * H, b, dh) for v in v_blocks]

    # ---- landmarks: q.k_lm + q.R_c(d), d = chunk(t) - 1 - chunk(landmark), clamped.
    last_q = min(g1 * b, g.N) - 1
    n_vis = (g.mem_len + last_q) // g.chunk * g.chunk_rank if k_lm.shape[2] else 0
    if n_vis:
        q_rows = qs
        # Distances this group can see: at most n_vis / r - 1, so later rows of R_c are unused.
        n_dist = min(r_lm_t.shape[-1], n_vis // g.chunk_rank)
        pos_lm = F.pad(torch.matmul(q_rows, r_lm_t[..., :n_dist]), (0, 1), value=neg)  # last column: invisible
        q_chunk = (g.mem_len + torch.arange(g0 * b, g1 * b, device=dev).view(nb, 1, 1, b, 1)) // g.chunk
        d = q_chunk - 1 - torch.arange(n_vis, device=dev) // g.chunk_rank
        idx = torch.where(d >= 0, d.clamp(max=n_dist - 1), n_dist)
        s_lm = pos_lm.gather(-1, idx.expand(nb, B, H, b, n_vis))
        s_lm = torch.matmul(q_rows, k_lm[:, :, :n_vis].transpose(-1, -2)).add_(s_lm)
        s_lm = s_lm.view(nb * B * H, b, n_vis)
        scores = torch.cat([s_lm, s_win], dim=-1)
        v_tiles.insert(0, v_lm[None, :, :, :n_vis].expand(nb, B, H, n_vis, dh).reshape(nb * B * H, n_vis, dh))
    else:
        scores = s_win

    probs = F.softmax(scores.to(softmax_dtype(scores.dtype)), dim=-1).to(g.dtype)
    if g.dropout_p > 0:
        probs = F.dropout(probs, p=g.dropout_p)
    # One matmul against [visible landmark values ; window values]: slicing probs instead
    # would zero-fill a probs-sized gradient per slice in the backward.
    out = torch.bmm(probs, torch.cat(v_tiles, dim=1))
    return out.view(nb, B, H, b, dh)
