"""The long-short core's contract, shared by every implementation (reference, blocked, fused): the geometry that
travels with its nine tensors, and the checks of their shapes (DESIGN.md section 2; model/attention/__init__.py
states the semantics). It lives at the bottom, in kernels/, because the kernels implement it and import nothing
from the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LongShortGeometry:
    """window w, chunk c, landmarks per chunk r, memory length M (positions before the segment), softmax scale
    (None: dh^-1/2)."""

    window: int
    chunk: int
    chunk_rank: int
    mem_len: int
    softmax_scale: float | None = None


def landmark_distance_rows(total_chunks: int, max_landmark_distance: int | None) -> int:
    """Rows of the landmark position table R_c needed for `total_chunks` chunks of [memory; segment].

    The furthest visible landmark of a query in the last chunk is at distance total_chunks - 2;
    with a clamp the table stops at the clamp. At least one row so the table is never empty.
    """
    rows = max(total_chunks - 1, 1)
    if max_landmark_distance is not None:
        rows = min(rows, max_landmark_distance + 1)
    return rows


def check_shapes(q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, k_lm: torch.Tensor, v_lm: torch.Tensor,
                 pos_bias_u: torch.Tensor, pos_bias_v: torch.Tensor, r_win: torch.Tensor, r_lm: torch.Tensor,
                 geo: LongShortGeometry) -> int:
    """Validate the core's inputs; returns P, the window keys before the segment."""
    window, chunk, chunk_rank, mem_len = geo.window, geo.chunk, geo.chunk_rank, geo.mem_len
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, N, dh), got {tuple(q.shape)}")
    B, H, N, dh = q.shape
    P = k_win.shape[2] - N
    if k_win.shape != (B, H, N + P, dh) or v_win.shape != k_win.shape:
        raise ValueError(f"k_win/v_win must be (B, H, P+N, dh) with q {tuple(q.shape)}; got "
                         f"{tuple(k_win.shape)} and {tuple(v_win.shape)}")
    if P != min(mem_len, window - 1):
        raise ValueError(f"k_win must start min(mem_len, window-1) = {min(mem_len, window - 1)} positions before "
                         f"the segment, got {P}")
    if window < chunk:
        raise ValueError(f"window ({window}) must be >= chunk ({chunk})")
    if N % chunk or mem_len % chunk:
        raise ValueError(f"N ({N}) and mem_len ({mem_len}) must be multiples of chunk ({chunk})")
    n_lm = k_lm.shape[2]
    if n_lm not in (0, (mem_len + N) // chunk * chunk_rank):
        raise ValueError(f"k_lm must hold (mem_len + N) / chunk * chunk_rank = "
                         f"{(mem_len + N) // chunk * chunk_rank} landmarks (or 0 for window-only), got {n_lm}")
    if k_lm.shape != (B, H, n_lm, dh) or v_lm.shape != k_lm.shape:
        raise ValueError(f"k_lm/v_lm must be (B, H, L, dh); got {tuple(k_lm.shape)} and {tuple(v_lm.shape)}")
    if pos_bias_u.shape != (H, dh) or pos_bias_v.shape != (H, dh):
        raise ValueError(f"pos_bias_u/v must be (H, dh) = {(H, dh)}")
    if r_win.shape != (H, window, dh):
        raise ValueError(f"r_win must be (H, window, dh) = {(H, window, dh)}, got {tuple(r_win.shape)}")
    if n_lm and (r_lm.dim() != 3 or r_lm.shape[0] != H or r_lm.shape[2] != dh or r_lm.shape[1] < 1):
        raise ValueError(f"r_lm must be (H, n_dist >= 1, dh), got {tuple(r_lm.shape)}")
    return P
