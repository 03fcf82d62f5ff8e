"""Backward Triton kernels of long-short attention (FlashAttention-2 style, key-major).

Probabilities are recomputed from the saved base-2 log-sum-exp. A small kernel computes
delta = rowsum(dO * O). Then two key-major kernels, one program per block of window keys or of
landmarks, walk the query blocks that see their block and do every product of the backward once per
tile: scores (and the position band), dP, dV and dK (accumulated in registers), dQ (and the band's dQ),
dR (band). A tile's dQ goes to an fp32 buffer by one relaxed atomic add (no memory fence: nothing reads
it before the kernel ends), so is the landmark band's gradient of R_c, and in band mode that of R_w.
In table mode the window's position gradient dS is stored at (i, d) (each pair once) and two GEMMs
finish the gradients of q, v and R_w. The bias gradients are per-program partial sums, added on the
host in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_ls.kernels.ls_forward import dot_precision, scaled_q_plus_v, window_pos_table
from megatron_ls.kernels.ls_tiles import (
    landmark_band_grad_t,
    landmark_band_t,
    landmark_query_start,
    load_queries,
    load_rows,
    window_band_grad_t,
    window_band_t,
    window_query_range,
)
from megatron_ls.kernels.triton_setup import LANDMARK_BAND, WINDOW_BAND, configs

DELTA_ROWS = 64  # rows of O and dO per program of the delta kernel
BIAS_BLOCK_MIN = 16  # the smallest BN of any tile: bounds the window kernel's programs per head


@triton.jit
def _delta_kernel(OUT, DO, DELTA, rows, DH: tl.constexpr, BR: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o = load_rows(OUT, offs, rows, DH).to(tl.float32)
    do = load_rows(DO, offs, rows, DH).to(tl.float32)
    tl.store(DELTA + offs, tl.sum(o * do, 1), mask=offs < rows)


@triton.jit
def _query_side(DO, LSE, DELTA, bh, offs_i, N, DH: tl.constexpr):
    """dO, log-sum-exp and delta of one query block."""
    row_ok = offs_i < N
    do = load_rows(DO + bh * N * DH, offs_i, N, DH)
    lse = tl.load(LSE + bh * N + offs_i, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * N + offs_i, mask=row_ok, other=0.0)
    return do, lse, delta


@triton.jit
def _probs_t(st, vis, lse, delta, dpt):
    """Probabilities and dS of a transposed tile (keys x queries) from its scores and dP."""
    pt = tl.where(vis, tl.exp2(st * 1.4426950408889634 - lse[None, :]), 0.0)
    return pt, pt * (dpt - delta[None, :])


@triton.jit
def _add_dq(DQ, bh, offs_i, N, dq, scale, DH: tl.constexpr):
    offs = bh * N * DH + offs_i[:, None] * DH + tl.arange(0, DH)[None, :]
    tl.atomic_add(DQ + offs, dq * scale, mask=(offs_i < N)[:, None], sem="relaxed")


@triton.autotune(configs=configs("bwd_window"), key=["N", "DH", "W", "POS_TABLE"], restore_value=["DQ", "DRW"])
@triton.heuristics(WINDOW_BAND)
@triton.jit
def _bwd_window_kernel(Q, KW, VW, U, V, RW, QR, DO, LSE, DELTA, DQ, DKW, DVW, DRW, DQR, DBIAS, scale,
                       H, N, P, W, NBLK,
                       DH: tl.constexpr, POS_TABLE: tl.constexpr, PREC: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, NDW: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    h = bh % H
    S = P + N
    s0 = pid * BN
    offs_s = s0 + tl.arange(0, BN)
    offs_d = tl.arange(0, DH)
    kw = load_rows(KW + bh * S * DH, offs_s, S, DH)
    vw = load_rows(VW + bh * S * DH, offs_s, S, DH)
    dt = kw.dtype
    dkw = tl.zeros((BN, DH), dtype=tl.float32)
    dvw = tl.zeros((BN, DH), dtype=tl.float32)
    # The biases' gradients: du = sum_s (sum_i dS[i, s]) k_s, dv (band mode) = sum over tiles of rowsum(dS_band) R_band.
    ds_sum = tl.zeros((BN,), dtype=tl.float32)
    dvb = tl.zeros((DH,), dtype=tl.float32)
    i_lo, i_hi = window_query_range(s0, P, W, N, BM, BN)
    for i0 in range(i_lo, i_hi, BM):
        offs_i = i0 + tl.arange(0, BM)
        qs, qu, qv = load_queries(Q, U, V, bh, h, offs_i, N, scale, DH)
        do, lse, delta = _query_side(DO, LSE, DELTA, bh, offs_i, N, DH)
        dist = P + offs_i[None, :] - offs_s[:, None]
        vis = (dist >= 0) & (dist < W) & (offs_i < N)[None, :]
        st = tl.dot(kw, tl.trans(qu), input_precision=PREC)
        if POS_TABLE:
            table = (offs_i - i0)[None, :] * W + dist  # int32 offsets from the block's first row: fewer registers
            st += tl.load(QR + (bh * N + i0) * W + table, mask=vis, other=0.0).to(tl.float32)
        else:
            pos, band, rb = window_band_t(qv, RW + h * W * DH, offs_i, offs_s, i0, s0, P, W, BN, NDW, DH, PREC)
            st += pos
        pt, dst = _probs_t(st, vis, lse, delta, tl.dot(vw, tl.trans(do), input_precision=PREC))
        dvw += tl.dot(pt.to(dt), do, input_precision=PREC)
        dkw += tl.dot(dst.to(dt), qu, input_precision=PREC)
        dq = tl.dot(tl.trans(dst.to(dt)), kw, input_precision=PREC)
        ds_sum += tl.sum(dst, 1)
        if POS_TABLE:
            tl.store(DQR + (bh * N + i0) * W + table, dst.to(DQR.dtype.element_ty), mask=vis)
        else:
            dsb = window_band_grad_t(dst, offs_i, band, s0, P, BN)
            dvb += tl.sum(tl.sum(dsb, 1)[:, None] * rb.to(tl.float32), 0)
            dsb = dsb.to(dt)
            dq = tl.dot(tl.trans(dsb), rb, dq, input_precision=PREC)
            band_ok = (band >= 0) & (band < W)
            tl.atomic_add(DRW + h * W * DH + band[:, None] * DH + offs_d[None, :],
                          tl.dot(dsb, qv, input_precision=PREC), mask=band_ok[:, None], sem="relaxed")
        _add_dq(DQ, bh, offs_i, N, dq, scale, DH)
    ptrs = bh * S * DH + offs_s[:, None] * DH + offs_d[None, :]
    tl.store(DKW + ptrs, dkw.to(DKW.dtype.element_ty), mask=(offs_s < S)[:, None])
    tl.store(DVW + ptrs, dvw.to(DVW.dtype.element_ty), mask=(offs_s < S)[:, None])
    tl.store(DBIAS + (bh * NBLK + pid) * DH + offs_d, tl.sum(ds_sum[:, None] * kw.to(tl.float32), 0))
    tl.store(DBIAS + ((tl.num_programs(1) + bh) * NBLK + pid) * DH + offs_d, dvb)


@triton.autotune(configs=configs("bwd_landmark"), key=["N", "DH", "C", "R"], restore_value=["DQ", "DRL"])
@triton.heuristics(LANDMARK_BAND)
@triton.jit
def _bwd_landmark_kernel(Q, KL, VL, RL, DO, LSE, DELTA, DQ, DKL, DVL, DRL, scale, H, N, M, L, ND, C, R,
                         DH: tl.constexpr, PREC: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, NDL: tl.constexpr, LSTEP: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    h = bh % H
    l0 = pid * LSTEP  # this program owns landmarks [l0, l0 + LSTEP): see landmark_tile
    l_end = tl.minimum(l0 + LSTEP, L)
    offs_l = l0 + tl.arange(0, BN)
    offs_d = tl.arange(0, DH)
    kl = load_rows(KL + bh * L * DH, offs_l, l_end, DH)
    vl = load_rows(VL + bh * L * DH, offs_l, l_end, DH)
    dt = kl.dtype
    dkl = tl.zeros((BN, DH), dtype=tl.float32)
    dvl = tl.zeros((BN, DH), dtype=tl.float32)
    for i0 in range(landmark_query_start(l0, M, C, R, BM), N, BM):
        offs_i = i0 + tl.arange(0, BM)
        qs = (load_rows(Q + bh * N * DH, offs_i, N, DH).to(tl.float32) * scale).to(dt)
        do, lse, delta = _query_side(DO, LSE, DELTA, bh, offs_i, N, DH)
        pos, dist, band, rb = landmark_band_t(qs, RL + h * ND * DH, offs_i, offs_l, i0, l0, M, ND, C, R, LSTEP, NDL,
                                              DH, PREC)
        st = tl.dot(kl, tl.trans(qs), input_precision=PREC) + pos
        vis = (dist >= 0) & (offs_l < l_end)[:, None] & (offs_i < N)[None, :]
        pt, dst = _probs_t(st, vis, lse, delta, tl.dot(vl, tl.trans(do), input_precision=PREC))
        dvl += tl.dot(pt.to(dt), do, input_precision=PREC)
        dkl += tl.dot(dst.to(dt), qs, input_precision=PREC)
        dsb = landmark_band_grad_t(dst, offs_i, band, l0, M, C, R, BN, BM, NDL).to(dt)
        dq = tl.dot(tl.trans(dst.to(dt)), kl, input_precision=PREC)
        dq = tl.dot(tl.trans(dsb), rb, dq, input_precision=PREC)
        _add_dq(DQ, bh, offs_i, N, dq, scale, DH)
        rows = tl.minimum(tl.maximum(band, 0), ND - 1)  # far distances share the clamp's last row
        tl.atomic_add(DRL + h * ND * DH + rows[:, None] * DH + offs_d[None, :],
                      tl.dot(dsb, qs, input_precision=PREC), mask=(band >= 0)[:, None], sem="relaxed")
    ptrs = bh * L * DH + offs_l[:, None] * DH + offs_d[None, :]
    tl.store(DKL + ptrs, dkl.to(DKL.dtype.element_ty), mask=(offs_l < l_end)[:, None])
    tl.store(DVL + ptrs, dvl.to(DVL.dtype.element_ty), mask=(offs_l < l_end)[:, None])


def row_dot(out: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O) in fp32, (B, H, N), read once from the half-precision tensors."""
    rows = out.numel() // out.shape[-1]
    delta = torch.empty(out.shape[:-1], device=out.device, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(rows, DELTA_ROWS),)](out, do, delta, rows, DH=out.shape[-1], BR=DELTA_ROWS)
    return delta


def long_short_backward(do, q, k_win, v_win, k_lm, v_lm, u, v, r_win, r_lm, out, lse, *, window: int, chunk: int,
                        chunk_rank: int, mem_len: int, scale: float,
                        pos_table: bool = False) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk_win, dv_win, dk_lm, dv_lm, du, dv, dr_win, dr_lm); du..dr_lm in fp32.

    pos_table: the window position table is rebuilt here (not saved by the forward) and its gradient dQR,
    written by the window kernel, goes to q, v and R_w through two GEMMs."""
    B, H, N, dh = q.shape
    S = k_win.shape[2]
    P = S - N
    L = k_lm.shape[2]
    ND = r_lm.shape[1]
    prec = dot_precision(q.dtype)
    f32 = dict(device=q.device, dtype=torch.float32)
    delta = row_dot(out, do)
    dq = torch.zeros((B, H, N, dh), **f32)  # scale * dL/d(scaled q), accumulated by both kernels
    dkw, dvw = torch.empty_like(k_win), torch.empty_like(v_win)
    dkl, dvl = torch.empty_like(k_lm), torch.empty_like(v_lm)
    drw, drl = torch.zeros((H, window, dh), **f32), torch.zeros((H, ND, dh), **f32)
    nblk = triton.cdiv(S, BIAS_BLOCK_MIN)
    dbias = torch.zeros((2, B, H, nblk, dh), **f32)  # per program: du, then dv (band mode)
    if pos_table:
        qv = scaled_q_plus_v(q, v, scale)
        qr = window_pos_table(qv, r_win)
        dqr = torch.empty_like(qr)
        dqr[:, :, :max(window - 1 - P, 0)].zero_()  # pairs (i, d) with no key (P + i - d < 0) are never written
    else:
        qr = dqr = q.new_empty(0)  # placeholders the kernels never touch

    _bwd_window_kernel[lambda m: (triton.cdiv(S, m["BN"]), B * H)](
        q, k_win, v_win, u, v, r_win, qr, do, lse, delta, dq, dkw, dvw, drw, dqr, dbias, scale, H, N, P, window,
        nblk, DH=dh, POS_TABLE=pos_table, PREC=prec)
    du, dv = dbias.sum((1, 3)).unbind(0)
    if pos_table:
        del qr
        dqv = torch.matmul(dqr, r_win.unsqueeze(0))  # d/d(q * scale + v): (B, H, N, dh)
        dq.add_(dqv, alpha=scale)
        dv = dv + dqv.sum((0, 2), dtype=torch.float32)
        for b in range(B):  # fixed order: the same bits every run
            drw += torch.matmul(dqr[b].transpose(1, 2), qv[b]).float()
    if L:
        _bwd_landmark_kernel[lambda m: (triton.cdiv(L, m["LSTEP"]), B * H)](
            q, k_lm, v_lm, r_lm, do, lse, delta, dq, dkl, dvl, drl, scale, H, N, mem_len, L, ND, chunk, chunk_rank,
            DH=dh, PREC=prec)
    return dq.to(q.dtype), dkw, dvw, dkl, dvl, du, dv, drw, drl
