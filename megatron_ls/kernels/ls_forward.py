"""Forward Triton kernel of long-short attention (FlashAttention-2 style).

One program per (query block, batch*head). It walks the landmark blocks the block can see (the
chunk-causal bound of its last query), then the window key blocks (t - w < s <= t), keeping ONE
online softmax over both, and stores the output and the base-2 log-sum-exp for the backward.
All tensors are contiguous (B, H, rows, dh); R tables are (H, rows, dh).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_ls.kernels.ls_tiles import (
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
                H, N, P, M, L, ND, W, C, R,
                DH: tl.constexpr, HAS_LM: tl.constexpr, POS_TABLE: tl.constexpr, HAS_LO: tl.constexpr,
                PREC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, NDW: tl.constexpr, NDL: tl.constexpr, LSTEP: tl.constexpr):
    # One program per (query block, batch*head): the visible landmark blocks, then the window key blocks, under
    # ONE online softmax. UK: u.k_s per window key, VR: v.R_w(d) per head and distance (fp32, key_bias and
    # position_bias).
    bh = tl.program_id(1).to(tl.int64)
    h = bh % H
    i0 = tl.program_id(0) * BM
    offs_i = i0 + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, DH)
    q = load_rows(Q + bh * N * DH, offs_i, N, DH)

    m_i = tl.full((BM,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, DH), dtype=tl.float32)

    if HAS_LM:
        for l0 in range(0, landmark_count(i0, M, N, C, R, BM), LSTEP):
            offs_l = l0 + offs_n
            l_end = tl.minimum(l0 + LSTEP, L)
            kl = load_rows(KL + bh * L * DH, offs_l, l_end, DH)
            vl = load_rows(VL + bh * L * DH, offs_l, l_end, DH)
            scores, vis = landmark_tile(q, kl, RL + h * ND * DH, offs_i, offs_l, i0, l0, l_end, M, N, ND, C, R, scale,
                                        LSTEP, NDL, DH, PREC)
            m_i, l_i, acc = _softmax_step(scores, vis, m_i, l_i, acc, vl, PREC)

    S = P + N
    s_lo, s_hi = window_key_range(i0, P, W, S, BM, BN)
    for s0 in range(s_lo, s_hi, BN):
        offs_s = s0 + offs_n
        kw = load_rows(KW + bh * S * DH, offs_s, S, DH)
        vw = load_rows(VW + bh * S * DH, offs_s, S, DH)
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
    out_ptrs = bh * N * DH + offs_i[:, None] * DH + offs_d[None, :]
    out_hi = out.to(OUT.dtype.element_ty)
    tl.store(OUT + out_ptrs, out_hi, mask=row_ok[:, None])
    if HAS_LO:  # what the half-precision output lost: the backward's delta = rowsum(dO * O) uses O = hi + lo
        tl.store(OUT_LO + out_ptrs, (out - out_hi.to(tl.float32)).to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh * N + offs_i, m_i + tl.log2(l_safe), mask=row_ok)


KEY_BIAS_ROWS = 64  # window keys per program of the key-bias kernel


@triton.jit
def _key_bias_kernel(KW, U, UK, rows, H, S, DH: tl.constexpr, BR: tl.constexpr):
    """UK[b, h, s] = u_h . k_s in fp32 for every window key (rows = B H S of them)."""
    offs = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    u = tl.load(U + ((offs // S) % H)[:, None] * DH + tl.arange(0, DH)[None, :], mask=(offs < rows)[:, None],
                other=0.0)
    k = load_rows(KW, offs, rows, DH).to(tl.float32)
    tl.store(UK + offs, tl.sum(k * u.to(tl.float32), 1), mask=offs < rows)


def key_bias(k_win: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """u_h . k_s in fp32, (B, H, S): the bias half of the window content term, read by the kernels per key."""
    B, H, S, dh = k_win.shape
    uk = torch.empty((B, H, S), device=k_win.device, dtype=torch.float32)
    rows = B * H * S
    _key_bias_kernel[(triton.cdiv(rows, KEY_BIAS_ROWS),)](k_win, u, uk, rows, H, S, DH=dh, BR=KEY_BIAS_ROWS)
    return uk


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact products (the fp32 tests compare tightly); half types use the tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def scaled_q_plus_v(q: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q * scale + v_h, summed in fp32 and rounded once to q's dtype (no fp32 copy of q: the sum runs in fp32
    inside the one elementwise pass)."""
    return torch.add(v[None, :, None, :], q, alpha=scale, out=torch.empty_like(q))


def position_bias(v: torch.Tensor, r_win: torch.Tensor) -> torch.Tensor:
    """v_h . R_w[h, d] in fp32, (H, w): the bias half of the window position term, added by the kernels in fp32."""
    return torch.matmul(r_win.float(), v.float().unsqueeze(-1)).squeeze(-1)


def window_pos_table(q: torch.Tensor, r_win: torch.Tensor, scale: float) -> torch.Tensor:
    """QR[b, h, i, d] = scale * q[b, h, i] . R_w[h, d]: the window position term as one batched GEMM (the scale
    in its epilogue), (B, H, N, w) in q's dtype; the kernels add v.R_w(d) (position_bias) in fp32."""
    B, H, N, dh = q.shape
    r_t = r_win.transpose(1, 2).expand(B, H, dh, r_win.shape[1]).reshape(B * H, dh, -1)
    out = torch.baddbmm(q.new_empty(()), q.reshape(B * H, N, dh), r_t, beta=0, alpha=scale)
    return out.view(B, H, N, -1)


def long_short_forward(q, k_win, v_win, k_lm, v_lm, u, v, r_win, r_lm, *, window: int, chunk: int,
                       chunk_rank: int, mem_len: int, scale: float,
                       pos_table: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward; inputs contiguous and of one dtype. Returns (out, lse in log2 units, out_lo): out_lo is
    the output's rounding residual in half precision (out + out_lo ~ the fp32 output), empty for fp32.

    pos_table: read the window position term from window_pos_table() (built here, freed on return)."""
    B, H, N, dh = q.shape
    P = k_win.shape[2] - N
    L = k_lm.shape[2]
    out = torch.empty_like(q)
    has_lo = q.dtype != torch.float32
    out_lo = torch.empty_like(q) if has_lo else q.new_empty(0)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    # The window position table, or a placeholder the kernel never reads.
    qr = window_pos_table(q, r_win, scale) if pos_table else q.new_empty(0)
    grid = lambda meta: (triton.cdiv(N, meta["BM"]), B * H)  # noqa: E731
    _fwd_kernel[grid](q, k_win, v_win, k_lm, v_lm, key_bias(k_win, u), r_win, position_bias(v, r_win), r_lm, qr,
                      out, out_lo, lse, scale, H, N, P, mem_len, L, r_lm.shape[1], window, chunk, chunk_rank,
                      DH=dh, HAS_LM=L > 0, POS_TABLE=pos_table, HAS_LO=has_lo, PREC=dot_precision(q.dtype))
    return out, lse, out_lo
