"""Backward Triton kernels of long-short attention (FlashAttention-2 style).

Probabilities are recomputed from the saved base-2 log-sum-exp. Three kernels:
- dq (query-major, the forward's loops): dq, and the gradients of u, v, R_w and R_c. The
  position-band gradients go to R by atomic adds (a band of rows per tile; far landmark distances
  clamp onto the table's last row, so rows of one add may repeat, which atomics handle).
- dk/dv of the window keys (key-major over the queries whose window holds the block),
- dk/dv of the landmarks (key-major over the queries of the later chunks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_ls.kernels.ls_forward import dot_precision, scaled_q_plus_v, window_pos_table
from megatron_ls.kernels.ls_tiles import (
    landmark_band_grad,
    landmark_tile,
    load_queries,
    query_block,
    window_band_grad,
    window_tile,
    window_tile_table,
)
from megatron_ls.kernels.triton_setup import BAND_SIZES, configs


@triton.jit
def _load_query_side(Q, U, V, DO, LSE, DELTA, bh, h, offs_i, N, scale, DH: tl.constexpr):
    """Scaled queries (plain, +u, +v), dO, log-sum-exp and delta = rowsum(dO * O) of one query block."""
    qs, qu, qv = load_queries(Q, U, V, bh, h, offs_i, N, scale, DH)
    offs_d = tl.arange(0, DH)
    row_ok = offs_i < N
    do = tl.load(DO + bh * N * DH + offs_i[:, None] * DH + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * N + offs_i, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * N + offs_i, mask=row_ok, other=0.0)
    return qs, qu, qv, do, lse, delta


@triton.jit
def _probs_and_dscores(scores, vis, lse, delta, do, v, PREC: tl.constexpr):
    p = tl.where(vis, tl.exp2(scores * 1.4426950408889634 - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    return p, p * (dp - delta[:, None])


@triton.autotune(configs=configs("dq"), key=["N", "DH", "W", "C", "R", "HAS_LM", "POS_TABLE"],
                 reset_to_zero=["DU", "DV", "DRW", "DRL"])  # DQR is stored, not accumulated: trials may repeat
@triton.heuristics(BAND_SIZES)
@triton.jit
def _dq_kernel(Q, KW, VW, KL, VL, U, V, RW, RL, QR, DO, LSE, DELTA, DQ, DU, DV, DRW, DRL, DQR, scale,
               H, N, P, M, L, ND, W, C, R,
               DH: tl.constexpr, HAS_LM: tl.constexpr, POS_TABLE: tl.constexpr, PREC: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, NDW: tl.constexpr, NDL: tl.constexpr,
               LSTEP: tl.constexpr):
    bh, h, i0, offs_i, offs_d, offs_n = query_block(H, BM, BN, DH)
    qs, qu, qv, do, lse, delta = _load_query_side(Q, U, V, DO, LSE, DELTA, bh, h, offs_i, N, scale, DH)
    dt = qs.dtype
    # One accumulator for the scaled query's gradient; u and v only need its column sums over the
    # block's rows, kept as (DH,) vectors (sum_i dS[i, s] k_s = colsum(dS) . k) to spare registers.
    dq = tl.zeros((BM, DH), dtype=tl.float32)
    du = tl.zeros((DH,), dtype=tl.float32)
    dv = tl.zeros((DH,), dtype=tl.float32)

    if HAS_LM:
        n_vis = (M + tl.minimum(i0 + BM, N) - 1) // C * R
        for l0 in range(0, n_vis, LSTEP):
            offs_l = l0 + offs_n
            l_end = tl.minimum(l0 + LSTEP, L)
            kv_mask = (offs_l < l_end)[:, None]
            kl = tl.load(KL + bh * L * DH + offs_l[:, None] * DH + offs_d[None, :], mask=kv_mask, other=0.0)
            vl = tl.load(VL + bh * L * DH + offs_l[:, None] * DH + offs_d[None, :], mask=kv_mask, other=0.0)
            scores, vis, rb, band = landmark_tile(qs, kl, RL + h * ND * DH, offs_i, offs_l, i0, l0, l_end, M, N,
                                                  ND, C, R, LSTEP, NDL, DH, PREC)
            p, ds = _probs_and_dscores(scores, vis, lse, delta, do, vl, PREC)
            dq += tl.dot(ds.to(dt), kl, input_precision=PREC)
            dsb = landmark_band_grad(ds, offs_i, band, l0, M, C, R, BM, BN, NDL).to(dt)
            dq += tl.dot(dsb, rb, input_precision=PREC)
            drb = tl.dot(tl.trans(dsb), qs, input_precision=PREC)
            rows = tl.minimum(tl.maximum(band, 0), ND - 1)
            tl.atomic_add(DRL + h * ND * DH + rows[:, None] * DH + offs_d[None, :], drb, mask=(band >= 0)[:, None])

    S = P + N
    s_lo = tl.maximum(P + i0 - W + 1, 0) // BN * BN
    s_hi = tl.minimum(P + i0 + BM, S)
    for s0 in range(s_lo, s_hi, BN):
        offs_s = s0 + offs_n
        kv_mask = (offs_s < S)[:, None]
        kw = tl.load(KW + bh * S * DH + offs_s[:, None] * DH + offs_d[None, :], mask=kv_mask, other=0.0)
        vw = tl.load(VW + bh * S * DH + offs_s[:, None] * DH + offs_d[None, :], mask=kv_mask, other=0.0)
        if POS_TABLE:  # the position term's gradient is dS itself, stored at (i, d); the host finishes it
            scores, vis, table = window_tile_table(qu, kw, QR + bh * N * W, offs_i, offs_s, P, N, W, PREC)
            p, ds = _probs_and_dscores(scores, vis, lse, delta, do, vw, PREC)
            tl.store(DQR + bh * N * W + table, ds.to(DQR.dtype.element_ty), mask=vis)
        else:
            scores, vis, rb, band = window_tile(qu, qv, kw, RW + h * W * DH, offs_i, offs_s, i0, s0, P, N, W,
                                                BN, NDW, DH, PREC)
            p, ds = _probs_and_dscores(scores, vis, lse, delta, do, vw, PREC)
            dsb = window_band_grad(ds, offs_i, band, s0, P, BN)
            dv += tl.sum(tl.sum(dsb, 0)[:, None] * rb.to(tl.float32), 0)
            dsb = dsb.to(dt)
            dq += tl.dot(dsb, rb, input_precision=PREC)
            drb = tl.dot(tl.trans(dsb), qv, input_precision=PREC)
            band_ok = (band >= 0) & (band < W)
            tl.atomic_add(DRW + h * W * DH + band[:, None] * DH + offs_d[None, :], drb, mask=band_ok[:, None])
        dq += tl.dot(ds.to(dt), kw, input_precision=PREC)
        du += tl.sum(tl.sum(ds, 0)[:, None] * kw.to(tl.float32), 0)

    tl.store(DQ + bh * N * DH + offs_i[:, None] * DH + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=(offs_i < N)[:, None])
    tl.atomic_add(DU + h * DH + offs_d, du)
    tl.atomic_add(DV + h * DH + offs_d, dv)


@triton.autotune(configs=configs("dkdv"), key=["N", "DH", "W", "C", "R", "POS_TABLE"])
@triton.heuristics(BAND_SIZES)
@triton.jit
def _dkdv_window_kernel(Q, KW, VW, U, V, RW, QR, DO, LSE, DELTA, DKW, DVW, scale, H, N, P, W, C, R,
                        DH: tl.constexpr, POS_TABLE: tl.constexpr, PREC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, NDW: tl.constexpr, NDL: tl.constexpr,
                        LSTEP: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    h = bh % H
    S = P + N
    s0 = pid_n * BN
    offs_s = s0 + tl.arange(0, BN)
    offs_d = tl.arange(0, DH)
    ptrs = bh * S * DH + offs_s[:, None] * DH + offs_d[None, :]
    kv_mask = (offs_s < S)[:, None]
    kw = tl.load(KW + ptrs, mask=kv_mask, other=0.0)
    vw = tl.load(VW + ptrs, mask=kv_mask, other=0.0)
    dkw = tl.zeros((BN, DH), dtype=tl.float32)
    dvw = tl.zeros((BN, DH), dtype=tl.float32)
    # Queries i see key s when 0 <= P + i - s < W.
    i_lo = tl.maximum(s0 - P, 0) // BM * BM
    i_hi = tl.minimum(s0 + BN - 1 - P + W, N)
    for i0 in range(i_lo, i_hi, BM):
        offs_i = i0 + tl.arange(0, BM)
        qs, qu, qv, do, lse, delta = _load_query_side(Q, U, V, DO, LSE, DELTA, bh, h, offs_i, N, scale, DH)
        if POS_TABLE:
            scores, vis, _t = window_tile_table(qu, kw, QR + bh * N * W, offs_i, offs_s, P, N, W, PREC)
        else:
            scores, vis, _rb, _band = window_tile(qu, qv, kw, RW + h * W * DH, offs_i, offs_s, i0, s0, P, N, W,
                                                  BN, NDW, DH, PREC)
        p, ds = _probs_and_dscores(scores, vis, lse, delta, do, vw, PREC)
        dvw += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dkw += tl.dot(tl.trans(ds.to(qu.dtype)), qu, input_precision=PREC)
    tl.store(DKW + ptrs, dkw.to(DKW.dtype.element_ty), mask=kv_mask)
    tl.store(DVW + ptrs, dvw.to(DVW.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=configs("dkdv"), key=["N", "DH", "C", "R"])
@triton.heuristics(BAND_SIZES)
@triton.jit
def _dkdv_landmark_kernel(Q, KL, VL, U, V, RL, DO, LSE, DELTA, DKL, DVL, scale, H, N, M, L, ND, C, R,
                          DH: tl.constexpr, PREC: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, NDW: tl.constexpr, NDL: tl.constexpr,
                        LSTEP: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    h = bh % H
    l0 = pid_n * LSTEP  # this program owns landmarks [l0, l0 + LSTEP): see landmark_tile
    l_end = tl.minimum(l0 + LSTEP, L)
    offs_l = l0 + tl.arange(0, BN)
    offs_d = tl.arange(0, DH)
    ptrs = bh * L * DH + offs_l[:, None] * DH + offs_d[None, :]
    kv_mask = (offs_l < l_end)[:, None]  # also keeps the stores off the next program's landmarks
    kl = tl.load(KL + ptrs, mask=kv_mask, other=0.0)
    vl = tl.load(VL + ptrs, mask=kv_mask, other=0.0)
    dkl = tl.zeros((BN, DH), dtype=tl.float32)
    dvl = tl.zeros((BN, DH), dtype=tl.float32)
    # Queries of the chunks after the block's first landmark chunk see it.
    i_lo = tl.maximum((l0 // R + 1) * C - M, 0) // BM * BM
    for i0 in range(i_lo, N, BM):
        offs_i = i0 + tl.arange(0, BM)
        qs, _qu, _qv, do, lse, delta = _load_query_side(Q, U, V, DO, LSE, DELTA, bh, h, offs_i, N, scale, DH)
        scores, vis, _rb, _band = landmark_tile(qs, kl, RL + h * ND * DH, offs_i, offs_l, i0, l0, l_end, M, N,
                                                ND, C, R, LSTEP, NDL, DH, PREC)
        p, ds = _probs_and_dscores(scores, vis, lse, delta, do, vl, PREC)
        dvl += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dkl += tl.dot(tl.trans(ds.to(qs.dtype)), qs, input_precision=PREC)
    tl.store(DKL + ptrs, dkl.to(DKL.dtype.element_ty), mask=kv_mask)
    tl.store(DVL + ptrs, dvl.to(DVL.dtype.element_ty), mask=kv_mask)


def long_short_backward(do, q, k_win, v_win, k_lm, v_lm, u, v, r_win, r_lm, out, lse, *, window: int, chunk: int,
                        chunk_rank: int, mem_len: int, scale: float,
                        pos_table: bool = False) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk_win, dv_win, dk_lm, dv_lm, du, dv, dr_win, dr_lm); du..dr_lm in fp32.

    pos_table: the window position table is rebuilt here (not saved by the forward) and its gradient dQR,
    written by the dq kernel, goes to q, v and R_w through two GEMMs."""
    B, H, N, dh = q.shape
    P = k_win.shape[2] - N
    L = k_lm.shape[2]
    ND = r_lm.shape[1]
    prec = dot_precision(q.dtype)
    delta = (do.float() * out.float()).sum(-1)
    dq = torch.empty_like(q)
    dkw, dvw = torch.empty_like(k_win), torch.empty_like(v_win)
    dkl, dvl = torch.empty_like(k_lm), torch.empty_like(v_lm)
    f32 = dict(device=q.device, dtype=torch.float32)
    du, dv = torch.zeros((H, dh), **f32), torch.zeros((H, dh), **f32)
    drw, drl = torch.zeros((H, window, dh), **f32), torch.zeros((H, ND, dh), **f32)
    # Pairs (i, d) with no key (i + P - d < 0) are never written: the table's gradient starts at zero.
    if pos_table:
        qv = scaled_q_plus_v(q, v, scale)
        qr, dqr = window_pos_table(qv, r_win), torch.zeros((B, H, N, window), device=q.device, dtype=q.dtype)
    else:
        qr = dqr = q.new_empty(0)  # placeholders the kernels never touch

    _dq_kernel[lambda m: (triton.cdiv(N, m["BM"]), B * H)](
        q, k_win, v_win, k_lm, v_lm, u, v, r_win, r_lm, qr, do, lse, delta, dq, du, dv, drw, drl, dqr, scale,
        H, N, P, mem_len, L, ND, window, chunk, chunk_rank, DH=dh, HAS_LM=L > 0, POS_TABLE=pos_table, PREC=prec)
    _dkdv_window_kernel[lambda m: (triton.cdiv(P + N, m["BN"]), B * H)](
        q, k_win, v_win, u, v, r_win, qr, do, lse, delta, dkw, dvw, scale, H, N, P, window, chunk, chunk_rank,
        DH=dh, POS_TABLE=pos_table, PREC=prec)
    if pos_table:
        del qr
        dqv = torch.matmul(dqr, r_win.unsqueeze(0))  # d/d(q * scale + v): (B, H, N, dh)
        dq = (dq.float() + dqv.float() * scale).to(dq.dtype)
        dv += dqv.float().sum((0, 2))
        drw += torch.matmul(dqr.transpose(2, 3), qv).float().sum(0)
    if L:
        _dkdv_landmark_kernel[lambda m: (triton.cdiv(L, m["LSTEP"]), B * H)](
            q, k_lm, v_lm, u, v, r_lm, do, lse, delta, dkl, dvl, scale, H, N, mem_len, L, ND, chunk, chunk_rank,
            DH=dh, PREC=prec)
    return dq, dkw, dvw, dkl, dvl, du, dv, drw, drl
