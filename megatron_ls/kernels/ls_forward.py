"""Forward Triton kernel of long-short attention (FlashAttention-2 style).

One program per (query block, batch*head). It walks the landmark blocks the block can see (the
chunk-causal bound of its last query), then the window key blocks (t - w < s <= t), keeping ONE
online softmax over both, and stores the output (with its rounding residual in half precision) and
the base-2 log-sum-exp for the backward. q, k, v and the output are token-major ((B, rows, H, dh)
memory, passed as (B, H, rows, dh) views; token_major()); R tables are (H, rows, dh). The host also
builds the fp32 bias terms u.k_s (key_bias) and v.R_w(d) (position_bias) and, in table mode, the
window position table (window_pos_table).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_ls.kernels.ls_tiles import (
    head_base,
    landmark_count,
    landmark_tile,
    load_rows,
    window_key_range,
    window_tile,
    window_tile_table,
)
from megatron_ls.kernels.triton_setup import BAND_SIZES, configs


@triton.jit
def _softmax_step(scores, vis, m_i, l_i, acc, v, PREC: tl.constexpr):
    s = tl.where(vis, scores * 1.4426950408889634, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # m_i starts finite, so rows with nothing visible stay NaN-free
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.autotune(configs=configs("fwd"), key=["N", "DH", "W", "C", "R", "HAS_LM", "POS_TABLE"])
@triton.heuristics(BAND_SIZES)
@triton.jit
def _fwd_kernel(Q, KW, VW, KL, VL, UK, RW, VR, RL, QR, OUT, OUT_LO, LSE, scale,
                H: tl.constexpr, N, P, M, L, ND, W, C, R, RS_K, RS_L,
                DH: tl.constexpr, HAS_LM: tl.constexpr, POS_TABLE: tl.constexpr, HAS_LO: tl.constexpr,
                PREC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, NDW: tl.constexpr, NDL: tl.constexpr, LSTEP: tl.constexpr):
    # One program per (query block, batch*head): the visible landmark blocks, then the window key blocks, under
    # ONE online softmax. Q, OUT: token-major (B, N, H, DH); KW, VW and KL, VL token-major with row strides RS_K and
    # RS_L. UK: u.k_s per window key, VR: v.R_w(d) per head and distance (fp32, key_bias and position_bias).
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    i0 = tl.program_id(0) * BM
    offs_i = i0 + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, DH)
    q = load_rows(head_base(Q, b, h, N, H * DH, DH), offs_i, N, H * DH, DH)

    m_i = tl.full((BM,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, DH), dtype=tl.float32)

    if HAS_LM:
        for l0 in range(0, landmark_count(i0, M, N, C, R, BM), LSTEP):
            offs_l = l0 + offs_n
            l_end = tl.minimum(l0 + LSTEP, L)
            kl = load_rows(head_base(KL, b, h, L, RS_L, DH), offs_l, l_end, RS_L, DH)
            vl = load_rows(head_base(VL, b, h, L, RS_L, DH), offs_l, l_end, RS_L, DH)
            scores, vis = landmark_tile(q, kl, RL + h * ND * DH, offs_i, offs_l, i0, l0, l_end, M, N, ND, C, R, scale,
                                        LSTEP, NDL, DH, PREC)
            m_i, l_i, acc = _softmax_step(scores, vis, m_i, l_i, acc, vl, PREC)

    S = P + N
    s_lo, s_hi = window_key_range(i0, P, W, S, BM, BN)
    for s0 in range(s_lo, s_hi, BN):
        offs_s = s0 + offs_n
        kw = load_rows(head_base(KW, b, h, S, RS_K, DH), offs_s, S, RS_K, DH)
        vw = load_rows(head_base(VW, b, h, S, RS_K, DH), offs_s, S, RS_K, DH)
        uk = tl.load(UK + bh * S + offs_s, mask=offs_s < S, other=0.0)
        if POS_TABLE:
            scores, vis = window_tile_table(q, kw, uk, QR + bh * N * W, VR + h * W, offs_i, offs_s, P, N, W, scale,
                                            PREC)
        else:
            scores, vis = window_tile(q, kw, uk, RW + h * W * DH, VR + h * W, offs_i, offs_s, i0, s0, P, N, W, scale,
                                      BN, NDW, DH, PREC)
        m_i, l_i, acc = _softmax_step(scores, vis, m_i, l_i, acc, vw, PREC)

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # only padding rows (i >= N) see nothing
    out = acc / l_safe[:, None]
    row_ok = offs_i < N
    out_ptrs = b * N * H * DH + h * DH + offs_i[:, None] * (H * DH) + offs_d[None, :]
    out_hi = out.to(OUT.dtype.element_ty)
    tl.store(OUT + out_ptrs, out_hi, mask=row_ok[:, None])
    if HAS_LO:  # what the half-precision output lost: the backward's delta = rowsum(dO * O) uses O = hi + lo
        tl.store(OUT_LO + out_ptrs, (out - out_hi.to(tl.float32)).to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh * N + offs_i, m_i + tl.log2(l_safe), mask=row_ok)


KEY_BIAS_ROWS = 64  # window keys per program of the key-bias kernel


@triton.jit
def _key_bias_kernel(KW, U, UK, H: tl.constexpr, S, RS_K, DH: tl.constexpr, BR: tl.constexpr):
    """UK[b, h, s] = u_h . k_s in fp32 for every window key (grid: key blocks x batch*heads)."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs = tl.program_id(0) * BR + tl.arange(0, BR)
    k = load_rows(head_base(KW, b, h, S, RS_K, DH), offs, S, RS_K, DH).to(tl.float32)
    u = tl.load(U + h * DH + tl.arange(0, DH)).to(tl.float32)
    tl.store(UK + bh * S + offs, tl.sum(k * u[None, :], 1), mask=offs < S)


def key_bias(k_win: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """u_h . k_s in fp32, (B, H, S): the bias half of the window content term, read by the kernels per key."""
    B, H, S, dh = k_win.shape
    uk = torch.empty((B, H, S), device=k_win.device, dtype=torch.float32)
    _key_bias_kernel[(triton.cdiv(S, KEY_BIAS_ROWS), B * H)](k_win, u, uk, H, S, row_stride(k_win), DH=dh,
                                                              BR=KEY_BIAS_ROWS)
    return uk


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact products (the fp32 tests compare tightly); half types use the tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def position_bias(v: torch.Tensor, r_win: torch.Tensor) -> torch.Tensor:
    """v_h . R_w[h, d] in fp32, (H, w): the bias half of the window position term, added by the kernels in fp32."""
    return torch.matmul(r_win.float(), v.float().unsqueeze(-1)).squeeze(-1)


def window_pos_table(q: torch.Tensor, r_win: torch.Tensor, scale: float) -> torch.Tensor:
    """QR[b, h, i, d] = scale * q[b, h, i] . R_w[h, d]: the window position term as batched GEMMs (the scale in
    their epilogue), (B, H, N, w) in q's dtype; the kernels add v.R_w(d) (position_bias) in fp32. One GEMM per
    batch row reads the token-major q in place (heads are a strided batch)."""
    B, H, N, dh = q.shape
    qr = q.new_empty(B, H, N, r_win.shape[1])
    for b in range(B):
        qr[b].baddbmm_(q[b], r_win.transpose(1, 2), beta=0, alpha=scale)
    return qr


def token_major(t: torch.Tensor, row_stride_free: bool = True) -> torch.Tensor:
    """t (B, H, L, dh) laid out as the kernels address it: the heads of a row side by side (the projections' own
    layout, (B, L, H, dh), which the attention layer passes as transposed views), rows RS >= H dh elements apart
    (any RS when row_stride_free: a slice of a wider buffer), batches L RS apart. Copies only otherwise."""
    B, H, L, dh = t.shape
    rs = t.stride(2)
    ok = t.stride(3) == 1 and (H == 1 or t.stride(1) == dh) and (B == 1 or t.stride(0) == L * rs)
    ok = ok and (L <= 1 or (rs == H * dh or (row_stride_free and rs > H * dh)))
    return t if ok else t.transpose(1, 2).contiguous().transpose(1, 2)


def empty_token_major(B: int, H: int, L: int, dh: int, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A (B, H, L, dh) view of a new contiguous (B, L, H, dh) tensor."""
    return torch.empty((B, L, H, dh), device=like.device, dtype=dtype or like.dtype).transpose(1, 2)


def row_stride(t: torch.Tensor) -> int:
    """The kernels' row stride of a token_major() tensor (any value when it has at most one row)."""
    return t.stride(2) if t.shape[2] > 1 else t.shape[1] * t.shape[3]


def long_short_forward(q, k_win, v_win, k_lm, v_lm, u, v, r_win, r_lm, *, window: int, chunk: int,
                       chunk_rank: int, mem_len: int, scale: float,
                       pos_table: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward; inputs of one dtype, token_major() (k and v with one row stride). Returns (out, lse in
    log2 units, out_lo), out token-major: out_lo is the output's rounding residual in half precision (out + out_lo
    ~ the fp32 output), empty for fp32.

    pos_table: read the window position term from window_pos_table() (built here, freed on return)."""
    B, H, N, dh = q.shape
    P = k_win.shape[2] - N
    L = k_lm.shape[2]
    out = empty_token_major(B, H, N, dh, q)
    has_lo = q.dtype != torch.float32
    out_lo = empty_token_major(B, H, N, dh, q) if has_lo else q.new_empty(0)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    # The window position table, or a placeholder the kernel never reads.
    qr = window_pos_table(q, r_win, scale) if pos_table else q.new_empty(0)
    grid = lambda meta: (triton.cdiv(N, meta["BM"]), B * H)  # noqa: E731
    _fwd_kernel[grid](q, k_win, v_win, k_lm, v_lm, key_bias(k_win, u), r_win, position_bias(v, r_win), r_lm, qr,
                      out, out_lo, lse, scale, H, N, P, mem_len, L, r_lm.shape[1], window, chunk, chunk_rank,
                      row_stride(k_win), row_stride(k_lm) if L else H * dh,
                      DH=dh, HAS_LM=L > 0, POS_TABLE=pos_table, HAS_LO=has_lo, PREC=dot_precision(q.dtype))
    return out, lse, out_lo
