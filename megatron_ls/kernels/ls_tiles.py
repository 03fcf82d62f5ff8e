"""Score tiles and loop bounds of long-short attention, shared by the forward and backward Triton kernels.

The forward is query-major (a tile is BM queries x BN keys, scores (BM, BN)); the backward is key-major
(a program owns BN keys or landmarks and walks the queries that see them, scores transposed: (BN, BM)).

Relative positions: the distances of a tile form one contiguous band, so the kernel multiplies the band of
R rows by the queries (one tl.dot) and moves each score to its key with tl.gather. The band's gradient is
the inverse gather of dS (window distances are unique per (i, s); landmark distances repeat across the r
landmarks of a chunk, hence the sum over m < r). The window term comes by default from a table
QR = scale q R_w^T computed by GEMMs outside the kernels (`*_table`: no band product, an N x w table per
head in memory); the backward then stores dS at (i, d) and two GEMMs finish the gradients of q, v and R_w.
Tensors are addressed token-major: row l of batch b, head h at b L RS + l RS + h DH (head_base, load_rows).

The loop bounds (`*_range`, `*_start`) use only integer arithmetic and the builtin min / max, so that
bench/kernel_work.py evaluates the very same functions in Python (`fn.fn(...)`) to count the work.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def window_key_range(i0, P, W, S, BM: tl.constexpr, BN: tl.constexpr):
    """Window key blocks of query block i0: keys [lo, hi), lo a multiple of BN (query i sees keys
    P + i - W < s <= P + i); no block in the range is wholly invisible."""
    return max(P + i0 - W + 1, 0) // BN * BN, min(P + i0 + BM, S)


@triton.jit
def window_query_range(s0, P, W, N, BM: tl.constexpr, BN: tl.constexpr):
    """Query blocks whose window holds a key of block s0: queries [lo, hi), lo a multiple of BM."""
    return max(s0 - P, 0) // BM * BM, min(s0 + BN - 1 - P + W, N)


@triton.jit
def landmark_count(i0, M, N, C, R, BM: tl.constexpr):
    """Landmarks [0, count) seen by query block i0: those of the chunks before its last query's chunk."""
    return (M + min(i0 + BM, N) - 1) // C * R


@triton.jit
def landmark_query_start(l0, M, C, R, BM: tl.constexpr):
    """First query block that sees landmark l0: the queries of the chunks after l0's chunk."""
    return max((l0 // R + 1) * C - M, 0) // BM * BM


@triton.jit
def window_band_start(i0, s0, P, BN: tl.constexpr):
    """The smallest window distance P + i - s of tile (i0, s0): its band is [start, start + NDW)."""
    return P + i0 - (s0 + BN - 1)


@triton.jit
def landmark_band_start(i0, l0, M, C, R, LSTEP: tl.constexpr):
    """The smallest landmark distance of tile (i0, l0): the first query's chunk - 1 - the last landmark's chunk."""
    return (M + i0) // C - 1 - (l0 + LSTEP - 1) // R


@triton.jit
def head_base(ptr, b, h, L, RS, DH: tl.constexpr):
    """Row 0 of batch b, head h of a token-major (B, L, H, DH) tensor whose rows are RS elements apart (RS >= H DH:
    a slice of a wider buffer, such as the window keys next to their values, needs no copy)."""
    return ptr + b * L * RS + h * DH


@triton.jit
def load_rows(base, offs, n, RS, DH: tl.constexpr):
    """Rows offs (RS elements apart) of a (rows, DH) matrix, zero past row n."""
    return tl.load(base + offs[:, None] * RS + tl.arange(0, DH)[None, :], mask=(offs < n)[:, None], other=0.0)


@triton.jit
def load_bias(ptr, h, DH: tl.constexpr):
    """Head h's row of a (H, DH) bias (u or v), in fp32."""
    return tl.load(ptr + h * DH + tl.arange(0, DH)).to(tl.float32)


# ---- forward orientation: scores (BM queries, BN keys). q is the unscaled query block; the scale multiplies
# the fp32 products, and the biases' terms u.k_s and v.R_w(d) are added in fp32, so that no rounded q^ + u or
# q^ + v is ever an operand (FlashAttention's practice; the bf16 numerics tests rely on it). ----

@triton.jit
def window_tile(q, kw, uk, rw_ptr, vr_ptr, offs_i, offs_s, i0, s0, P, N, W, scale,
                BN: tl.constexpr, NDW: tl.constexpr, DH: tl.constexpr, PREC: tl.constexpr):
    """Scores (q^+u).k_s + (q^+v).R_w(P+i-s) of one window tile and its visibility; uk = u.k_s of the tile's keys,
    vr_ptr: v.R_w(d) per distance."""
    dist = P + offs_i[:, None] - offs_s[None, :]
    dlo = window_band_start(i0, s0, P, BN)
    rows = tl.minimum(tl.maximum(dlo + tl.arange(0, NDW), 0), W - 1)  # rows outside [0, W) meet invisible pairs
    rb = load_rows(rw_ptr, rows, W, DH, DH)
    band = tl.dot(q, tl.trans(rb), input_precision=PREC) * scale + tl.load(vr_ptr + rows)[None, :]
    scores = tl.dot(q, tl.trans(kw), input_precision=PREC) * scale + uk[None, :] + tl.gather(band, dist - dlo, 1)
    return scores, (dist >= 0) & (dist < W) & (offs_i < N)[:, None]


@triton.jit
def window_tile_table(q, kw, uk, qr_ptr, vr_ptr, offs_i, offs_s, P, N, W, scale, PREC: tl.constexpr):
    """The window tile with its position term read from QR[i, d] = q^_i.R_w(d) (+ v.R_w(d)): a skewed load,
    d = P+i-s."""
    dist = P + offs_i[:, None] - offs_s[None, :]
    vis = (dist >= 0) & (dist < W) & (offs_i < N)[:, None]
    pos = tl.load(qr_ptr + offs_i[:, None] * W + dist, mask=vis, other=0.0).to(tl.float32)
    pos += tl.load(vr_ptr + dist, mask=vis, other=0.0)
    return tl.dot(q, tl.trans(kw), input_precision=PREC) * scale + uk[None, :] + pos, vis


@triton.jit
def landmark_tile(q, kl, rl_ptr, offs_i, offs_l, i0, l0, l_end, M, N, ND, C, R, scale,
                  LSTEP: tl.constexpr, NDL: tl.constexpr, DH: tl.constexpr, PREC: tl.constexpr):
    """Scores q^.k_l + q^.R_c(min(d, ND-1)), d = chunk(i) - 1 - chunk(l), and chunk-causal visibility.

    The tile's block holds BN landmark rows but owns only [l0, l_end), l_end <= l0 + LSTEP: LSTEP is chosen
    (triton_setup) so that the distances of the owned landmarks fit a band of NDL rows, about BN / r instead
    of twice that. The rows past l_end are invisible and their band index is clamped."""
    dist = ((M + offs_i) // C)[:, None] - 1 - (offs_l // R)[None, :]
    dlo = landmark_band_start(i0, l0, M, C, R, LSTEP)
    rows = tl.minimum(tl.maximum(dlo + tl.arange(0, NDL), 0), ND - 1)  # the clamp of far distances
    rb = load_rows(rl_ptr, rows, ND, DH, DH)
    idx = tl.minimum(tl.maximum(dist - dlo, 0), NDL - 1)
    pos = tl.gather(tl.dot(q, tl.trans(rb), input_precision=PREC), idx, 1)
    scores = (tl.dot(q, tl.trans(kl), input_precision=PREC) + pos) * scale
    return scores, (dist >= 0) & (offs_l < l_end)[None, :] & (offs_i < N)[:, None]


# ---- backward orientation: scores transposed, (BN keys, BM queries) ----

@triton.jit
def window_band_t(q, rw_ptr, vr_ptr, offs_i, offs_s, i0, s0, P, W, scale, BN: tl.constexpr, NDW: tl.constexpr,
                  DH: tl.constexpr, PREC: tl.constexpr):
    """Position term (q^_i+v).R_w(P+i-s) of a transposed window tile, with its band rows and R rows."""
    dlo = window_band_start(i0, s0, P, BN)
    band = dlo + tl.arange(0, NDW)
    rows = tl.minimum(tl.maximum(band, 0), W - 1)
    rb = load_rows(rw_ptr, rows, W, DH, DH)
    bt = tl.dot(rb, tl.trans(q), input_precision=PREC) * scale + tl.load(vr_ptr + rows)[:, None]
    return tl.gather(bt, P + offs_i[None, :] - offs_s[:, None] - dlo, 0), band, rb


@triton.jit
def window_band_grad_t(dst, offs_i, band, s0, P, BN: tl.constexpr):
    """dS^T of a window tile moved to band order: out[j, i] = dS^T[s, i] with P + i - s = band[j]."""
    row = P + offs_i[None, :] - band[:, None] - s0
    ok = (row >= 0) & (row < BN)
    return tl.where(ok, tl.gather(dst, tl.minimum(tl.maximum(row, 0), BN - 1), 0), 0.0)


@triton.jit
def landmark_band_t(q, rl_ptr, offs_i, offs_l, i0, l0, M, ND, C, R, LSTEP: tl.constexpr, NDL: tl.constexpr,
                    DH: tl.constexpr, PREC: tl.constexpr):
    """Unscaled position term q_i.R_c(d) of a transposed landmark tile, its band rows, R rows and distances d."""
    dist = ((M + offs_i) // C)[None, :] - 1 - (offs_l // R)[:, None]
    dlo = landmark_band_start(i0, l0, M, C, R, LSTEP)
    band = dlo + tl.arange(0, NDL)
    rb = load_rows(rl_ptr, tl.minimum(tl.maximum(band, 0), ND - 1), ND, DH, DH)
    idx = tl.minimum(tl.maximum(dist - dlo, 0), NDL - 1)
    return tl.gather(tl.dot(rb, tl.trans(q), input_precision=PREC), idx, 0), dist, band, rb


@triton.jit
def landmark_band_grad_t(dst, offs_i, band, l0, M, C, R, BN: tl.constexpr, BM: tl.constexpr,
                         NDL: tl.constexpr):
    """dS^T of a landmark tile summed into band order over the r landmarks of each chunk: (NDL, BM)."""
    chunk = ((M + offs_i) // C)[None, :] - 1 - band[:, None]  # the landmark chunk at that distance
    out = tl.zeros((NDL, BM), dtype=tl.float32)
    for m in range(R):
        row = chunk * R + m - l0
        ok = (row >= 0) & (row < BN) & (chunk >= 0)
        out += tl.where(ok, tl.gather(dst, tl.minimum(tl.maximum(row, 0), BN - 1), 0), 0.0)
    return out
