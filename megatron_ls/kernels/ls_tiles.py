"""Score tiles of long-short attention, shared by the forward and backward Triton kernels.

A tile is BM queries (rows i) against BN keys. Its relative-position term needs one row of R per
distance; the distances of a tile form one contiguous band, so the kernel multiplies the query
tile by that band of R (one small tl.dot) and moves each score to its key with tl.gather. The
band's gradient is the inverse gather of dS (window distances are unique per (i, s); landmark
distances repeat across the r landmarks of a chunk, hence the sum over k < r).

The window term can instead come from a table QR = (q+v) R_w^T computed by one GEMM outside the
kernel (window_tile_table): less arithmetic and fewer registers per tile, for an N x w table per head
in memory. Which is faster is the GPU's to say (bench/gpu_check.sh measures both).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def query_block(H, BM: tl.constexpr, BN: tl.constexpr, DH: tl.constexpr):
    """This program's coordinates (grid: query blocks x batch*heads): batch*head (int64), head, first query,
    the block's query rows, the head-dim offsets and the offsets of one key block."""
    bh = tl.program_id(1).to(tl.int64)
    i0 = tl.program_id(0) * BM
    return bh, bh % H, i0, i0 + tl.arange(0, BM), tl.arange(0, DH), tl.arange(0, BN)


@triton.jit
def load_queries(Q, U, V, bh, h, offs_i, N, scale, DH: tl.constexpr):
    """One query block, scaled, plain and with the biases u and v added (fp32 sums, input dtype out)."""
    offs_d = tl.arange(0, DH)
    q = tl.load(Q + bh * N * DH + offs_i[:, None] * DH + offs_d[None, :], mask=(offs_i < N)[:, None], other=0.0)
    qs32 = q.to(tl.float32) * scale
    qu = (qs32 + tl.load(U + h * DH + offs_d).to(tl.float32)[None, :]).to(q.dtype)
    qv = (qs32 + tl.load(V + h * DH + offs_d).to(tl.float32)[None, :]).to(q.dtype)
    return qs32.to(q.dtype), qu, qv


@triton.jit
def window_tile(qu, qv, kw, rw_ptr, offs_i, offs_s, i0, s0, P, N, W,
                BN: tl.constexpr, NDW: tl.constexpr, DH: tl.constexpr, PREC: tl.constexpr):
    """Scores (q+u).k_s + (q+v).R_w(P+i-s) of one window tile, its visibility and its R band."""
    offs_d = tl.arange(0, DH)
    dist = P + offs_i[:, None] - offs_s[None, :]
    dlo = P + i0 - (s0 + BN - 1)
    band = dlo + tl.arange(0, NDW)
    rows = tl.minimum(tl.maximum(band, 0), W - 1)  # rows outside [0, W) only meet invisible pairs
    rb = tl.load(rw_ptr + rows[:, None] * DH + offs_d[None, :])
    pos = tl.gather(tl.dot(qv, tl.trans(rb), input_precision=PREC), dist - dlo, 1)
    scores = tl.dot(qu, tl.trans(kw), input_precision=PREC) + pos
    vis = (dist >= 0) & (dist < W) & (offs_i < N)[:, None]
    return scores, vis, rb, band


@triton.jit
def window_tile_table(qu, kw, qr_ptr, offs_i, offs_s, P, N, W, PREC: tl.constexpr):
    """The window tile with its position term read from a precomputed table QR[i, d] = (q_i+v).R_w(d)
    (MEGATRON_LS_WINDOW_POS=table): a skewed load, d = P + i - s, instead of the band product and gather.
    Returns the scores, the visibility and the table offsets (the backward stores dS there)."""
    dist = P + offs_i[:, None] - offs_s[None, :]
    vis = (dist >= 0) & (dist < W) & (offs_i < N)[:, None]
    table = offs_i[:, None] * W + dist
    pos = tl.load(qr_ptr + table, mask=vis, other=0.0).to(tl.float32)
    return tl.dot(qu, tl.trans(kw), input_precision=PREC) + pos, vis, table


@triton.jit
def landmark_tile(qs, kl, rl_ptr, offs_i, offs_l, i0, l0, l_end, M, N, ND, C, R,
                  LSTEP: tl.constexpr, NDL: tl.constexpr, DH: tl.constexpr, PREC: tl.constexpr):
    """Scores q.k_l + q.R_c(min(d, ND-1)), d = chunk(i) - 1 - chunk(l), and chunk-causal visibility.

    The tile's block holds BN landmark rows but owns only [l0, l_end), l_end <= l0 + LSTEP: LSTEP is chosen
    (triton_setup) so that the distances of the owned landmarks fit a band of NDL rows, about BN / r instead
    of twice that. The rows past l_end are invisible and their band index is clamped."""
    offs_d = tl.arange(0, DH)
    qc = (M + offs_i) // C
    dist = qc[:, None] - 1 - (offs_l // R)[None, :]
    dlo = (M + i0) // C - 1 - (l0 + LSTEP - 1) // R
    band = dlo + tl.arange(0, NDL)
    rows = tl.minimum(tl.maximum(band, 0), ND - 1)  # the clamp of far distances, as in the reference
    rb = tl.load(rl_ptr + rows[:, None] * DH + offs_d[None, :])
    idx = tl.minimum(tl.maximum(dist - dlo, 0), NDL - 1)
    pos = tl.gather(tl.dot(qs, tl.trans(rb), input_precision=PREC), idx, 1)
    scores = tl.dot(qs, tl.trans(kl), input_precision=PREC) + pos
    vis = (dist >= 0) & (offs_l < l_end)[None, :] & (offs_i < N)[:, None]
    return scores, vis, rb, band


@triton.jit
def window_band_grad(ds, offs_i, band, s0, P, BN: tl.constexpr):
    """dS of a window tile moved to band order: out[i, j] = dS[i, s] with P + i - s = band[j]."""
    col = P + offs_i[:, None] - band[None, :] - s0
    ok = (col >= 0) & (col < BN)
    g = tl.gather(ds, tl.minimum(tl.maximum(col, 0), BN - 1), 1)
    return tl.where(ok, g, 0.0)


@triton.jit
def landmark_band_grad(ds, offs_i, band, l0, M, C, R, BM: tl.constexpr, BN: tl.constexpr, NDL: tl.constexpr):
    """dS of a landmark tile summed into band order over the r landmarks of each chunk."""
    lc = ((M + offs_i) // C)[:, None] - 1 - band[None, :]
    out = tl.zeros((BM, NDL), dtype=tl.float32)
    for k in range(R):
        col = lc * R + k - l0
        ok = (col >= 0) & (col < BN) & (lc >= 0)
        g = tl.gather(ds, tl.minimum(tl.maximum(col, 0), BN - 1), 1)
        out += tl.where(ok, g, 0.0)
    return out
