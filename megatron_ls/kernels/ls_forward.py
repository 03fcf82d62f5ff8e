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
    load_queries,
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
def _fwd_kernel(Q, KW, VW, KL, VL, U, V, RW, RL, QR, OUT, LSE, scale,
                H, N, P, M, L, ND, W, C, R,
                DH: tl.constexpr, HAS_LM: tl.constexpr, POS_TABLE: tl.constexpr, PREC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, NDW: tl.constexpr, NDL: tl.constexpr, LSTEP: tl.constexpr):
    # One program per (query block, batch*head): the visible landmark blocks, then the window key blocks, under
    # ONE online softmax.
    bh = tl.program_id(1).to(tl.int64)
    h = bh % H
    i0 = tl.program_id(0) * BM
    offs_i = i0 + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, DH)
    qs, qu, qv = load_queries(Q, U, V, bh, h, offs_i, N, scale, DH)

    m_i = tl.full((BM,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, DH), dtype=tl.float32)

    if HAS_LM:
        for l0 in range(0, landmark_count(i0, M, N, C, R, BM), LSTEP):
            offs_l = l0 + offs_n
            l_end = tl.minimum(l0 + LSTEP, L)
            kl = load_rows(KL + bh * L * DH, offs_l, l_end, DH)
            vl = load_rows(VL + bh * L * DH, offs_l, l_end, DH)
            scores, vis = landmark_tile(qs, kl, RL + h * ND * DH, offs_i, offs_l, i0, l0, l_end, M, N, ND, C, R,
                                        LSTEP, NDL, DH, PREC)
            m_i, l_i, acc = _softmax_step(scores, vis, m_i, l_i, acc, vl, PREC)

    S = P + N
    s_lo, s_hi = window_key_range(i0, P, W, S, BM, BN)
    for s0 in range(s_lo, s_hi, BN):
        offs_s = s0 + offs_n
        kw = load_rows(KW + bh * S * DH, offs_s, S, DH)
        vw = load_rows(VW + bh * S * DH, offs_s, S, DH)
        if POS_TABLE:
            scores, vis = window_tile_table(qu, kw, QR + bh * N * W, offs_i, offs_s, P, N, W, PREC)
        else:
            scores, vis = window_tile(qu, qv, kw, RW + h * W * DH, offs_i, offs_s, i0, s0, P, N, W, BN, NDW, DH,
                                      PREC)
        m_i, l_i, acc = _softmax_step(scores, vis, m_i, l_i, acc, vw, PREC)

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # only padding rows (i >= N) see nothing
    out = acc / l_safe[:, None]
    row_ok = offs_i < N
    tl.store(OUT + bh * N * DH + offs_i[:, None] * DH + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + bh * N + offs_i, m_i + tl.log2(l_safe), mask=row_ok)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact products (the fp32 tests compare tightly); half types use the tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def scaled_q_plus_v(q: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q * scale + v_h, summed in fp32 and rounded once to q's dtype as the kernels' own q+v (no fp32 copy of q:
    the sum runs in fp32 inside the one elementwise pass)."""
    return torch.add(v[None, :, None, :], q, alpha=scale, out=torch.empty_like(q))


def window_pos_table(qv: torch.Tensor, r_win: torch.Tensor) -> torch.Tensor:
    """QR[b, h, i, d] = qv[b, h, i] . R_w[h, d] with qv = scaled_q_plus_v(): the window position term as one
    batched GEMM, (B, H, N, w) in qv's dtype."""
    return torch.matmul(qv, r_win.transpose(1, 2).unsqueeze(0))


def long_short_forward(q, k_win, v_win, k_lm, v_lm, u, v, r_win, r_lm, *, window: int, chunk: int,
                       chunk_rank: int, mem_len: int, scale: float,
                       pos_table: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward; inputs contiguous and of one dtype. Returns (out, lse in log2 units).

    pos_table: read the window position term from window_pos_table() (built here, freed on return)."""
    B, H, N, dh = q.shape
    P = k_win.shape[2] - N
    L = k_lm.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    # The window position table, or a placeholder the kernel never reads.
    qr = window_pos_table(scaled_q_plus_v(q, v, scale), r_win) if pos_table else q.new_empty(0)
    grid = lambda meta: (triton.cdiv(N, meta["BM"]), B * H)  # noqa: E731
    _fwd_kernel[grid](q, k_win, v_win, k_lm, v_lm, u, v, r_win, r_lm, qr, out, lse, scale,
                      H, N, P, mem_len, L, r_lm.shape[1], window, chunk, chunk_rank,
                      DH=dh, HAS_LM=L > 0, POS_TABLE=pos_table, PREC=dot_precision(q.dtype))
    return out, lse
