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

from megatron_ls.kernels.ls_forward import (
    dot_precision,
    empty_token_major,
    key_bias,
    position_bias,
    row_stride,
    window_pos_table,
)
from megatron_ls.kernels.ls_tiles import (
    head_base,
    landmark_band_grad_t,
    landmark_band_t,
    landmark_query_start,
    load_bias,
    load_rows,
    window_band_grad_t,
    window_band_t,
    window_query_range,
)
from megatron_ls.kernels.triton_setup import LANDMARK_BAND, WINDOW_BAND, configs

DELTA_ROWS = 64  # rows of O and dO per program of the delta kernel
BIAS_BLOCK_MIN = 16  # the smallest BN of any tile: bounds the window kernel's programs per head


@triton.jit
def _delta_kernel(OUT, OUT_LO, DO, DELTA, H: tl.constexpr, N, DH: tl.constexpr, HAS_LO: tl.constexpr, BR: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs = tl.program_id(0) * BR + tl.arange(0, BR)
    o = load_rows(head_base(OUT, b, h, N, H * DH, DH), offs, N, H * DH, DH).to(tl.float32)
    if HAS_LO:
        o += load_rows(head_base(OUT_LO, b, h, N, H * DH, DH), offs, N, H * DH, DH).to(tl.float32)
    do = load_rows(head_base(DO, b, h, N, H * DH, DH), offs, N, H * DH, DH).to(tl.float32)
    tl.store(DELTA + bh * N + offs, tl.sum(o * do, 1), mask=offs < N)


@triton.jit
def _query_side(Q, DO, LSE, DELTA, b, h, bh, offs_i, H, N, DH: tl.constexpr):
    """Queries (unscaled), dO, log-sum-exp and delta of one query block (Q, DO token-major contiguous)."""
    row_ok = offs_i < N
    q = load_rows(head_base(Q, b, h, N, H * DH, DH), offs_i, N, H * DH, DH)
    do = load_rows(head_base(DO, b, h, N, H * DH, DH), offs_i, N, H * DH, DH)
    lse = tl.load(LSE + bh * N + offs_i, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * N + offs_i, mask=row_ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def _probs_t(st, vis, lse, delta, dpt):
    """Probabilities and dS of a transposed tile (keys x queries) from its scores and dP."""
    pt = tl.where(vis, tl.exp2(st * 1.4426950408889634 - lse[None, :]), 0.0)
    return pt, pt * (dpt - delta[None, :])


@triton.jit
def _add_dq(DQ, b, h, offs_i, H, N, dq, scale, DH: tl.constexpr):
    ptrs = head_base(DQ, b, h, N, H * DH, DH) + offs_i[:, None] * (H * DH) + tl.arange(0, DH)[None, :]
    tl.atomic_add(ptrs, dq * scale, mask=(offs_i < N)[:, None], sem="relaxed")


@triton.jit
def _store_rows(PTR, b, h, offs, n, L, H, value, DH: tl.constexpr):
    """Rows offs (those < n) of batch b, head h of a token-major contiguous (B, L, H, DH) tensor."""
    ptrs = head_base(PTR, b, h, L, H * DH, DH) + offs[:, None] * (H * DH) + tl.arange(0, DH)[None, :]
    tl.store(ptrs, value.to(PTR.dtype.element_ty), mask=(offs < n)[:, None])


@triton.autotune(configs=configs("bwd_window"), key=["N", "DH", "W", "POS_TABLE"], restore_value=["DQ", "DRW"])
@triton.heuristics(WINDOW_BAND)
@triton.jit
def _bwd_window_kernel(Q, KW, VW, U, V, UK, RW, VR, QR, DO, LSE, DELTA, DQ, DKW, DVW, DRW, DQR, DBIAS, scale,
                       H: tl.constexpr, N, P, W, NBLK, RS_K,
                       DH: tl.constexpr, POS_TABLE: tl.constexpr, PREC: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, NDW: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    S = P + N
    s0 = pid * BN
    offs_s = s0 + tl.arange(0, BN)
    offs_d = tl.arange(0, DH)
    kw = load_rows(head_base(KW, b, h, S, RS_K, DH), offs_s, S, RS_K, DH)
    vw = load_rows(head_base(VW, b, h, S, RS_K, DH), offs_s, S, RS_K, DH)
    dt = kw.dtype
    uk = tl.load(UK + bh * S + offs_s, mask=offs_s < S, other=0.0)
    dkw = tl.zeros((BN, DH), dtype=tl.float32)  # sum_i dS[i, s] q_i; dk = scale * that + (sum_i dS[i, s]) u
    dvw = tl.zeros((BN, DH), dtype=tl.float32)
    ds_sum = tl.zeros((BN,), dtype=tl.float32)  # sum_i dS[i, s]: gives du and the u half of dk
    dvb = tl.zeros((DH,), dtype=tl.float32)  # band mode: the v bias' gradient, rowsum(dS_band) . R_band
    if not POS_TABLE:
        v = load_bias(V, h, DH)
    i_lo, i_hi = window_query_range(s0, P, W, N, BM, BN)
    for i0 in range(i_lo, i_hi, BM):
        offs_i = i0 + tl.arange(0, BM)
        q, do, lse, delta = _query_side(Q, DO, LSE, DELTA, b, h, bh, offs_i, H, N, DH)
        dist = P + offs_i[None, :] - offs_s[:, None]
        vis = (dist >= 0) & (dist < W) & (offs_i < N)[None, :]
        st = tl.dot(kw, tl.trans(q), input_precision=PREC) * scale + uk[:, None]
        if POS_TABLE:
            table = (offs_i - i0)[None, :] * W + dist  # int32 offsets from the block's first row: fewer registers
            st += tl.load(QR + (bh * N + i0) * W + table, mask=vis, other=0.0).to(tl.float32)
            st += tl.load(VR + h * W + dist, mask=vis, other=0.0)
        else:
            pos, band, rb = window_band_t(q, RW + h * W * DH, VR + h * W, offs_i, offs_s, i0, s0, P, W, scale, BN,
                                          NDW, DH, PREC)
            st += pos
        pt, dst = _probs_t(st, vis, lse, delta, tl.dot(vw, tl.trans(do), input_precision=PREC))
        if POS_TABLE:  # stored first, so that the offsets and the mask are dead before the products
            tl.store(DQR + (bh * N + i0) * W + table, dst.to(DQR.dtype.element_ty), mask=vis)
        ds_sum += tl.sum(dst, 1)
        dvw += tl.dot(pt.to(dt), do, input_precision=PREC)
        dkw += tl.dot(dst.to(dt), q, input_precision=PREC)
        dq = tl.dot(tl.trans(dst.to(dt)), kw, input_precision=PREC)
        if not POS_TABLE:
            dsb = window_band_grad_t(dst, offs_i, band, s0, P, BN)
            dsb_sum = tl.sum(dsb, 1)
            dvb += tl.sum(dsb_sum[:, None] * rb.to(tl.float32), 0)
            dsb = dsb.to(dt)
            dq = tl.dot(tl.trans(dsb), rb, dq, input_precision=PREC)
            drb = tl.dot(dsb, q, input_precision=PREC) * scale + dsb_sum[:, None] * v[None, :]
            band_ok = (band >= 0) & (band < W)
            tl.atomic_add(DRW + h * W * DH + band[:, None] * DH + offs_d[None, :], drb, mask=band_ok[:, None],
                          sem="relaxed")
        _add_dq(DQ, b, h, offs_i, H, N, dq, scale, DH)
    _store_rows(DKW, b, h, offs_s, S, S, H, dkw * scale + ds_sum[:, None] * load_bias(U, h, DH)[None, :], DH)
    _store_rows(DVW, b, h, offs_s, S, S, H, dvw, DH)
    # k again: holding it in registers through the loop would spill
    kw = load_rows(head_base(KW, b, h, S, RS_K, DH), offs_s, S, RS_K, DH)
    tl.store(DBIAS + (bh * NBLK + pid) * DH + offs_d, tl.sum(ds_sum[:, None] * kw.to(tl.float32), 0))
    tl.store(DBIAS + ((tl.num_programs(1) + bh) * NBLK + pid) * DH + offs_d, dvb)


@triton.autotune(configs=configs("bwd_landmark"), key=["N", "DH", "C", "R"], restore_value=["DQ", "DRL"])
@triton.heuristics(LANDMARK_BAND)
@triton.jit
def _bwd_landmark_kernel(Q, KL, VL, RL, DO, LSE, DELTA, DQ, DKL, DVL, DRL, scale, H: tl.constexpr, N, M, L, ND, C, R,
                         RS_L,
                         DH: tl.constexpr, PREC: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, NDL: tl.constexpr, LSTEP: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    l0 = pid * LSTEP  # this program owns landmarks [l0, l0 + LSTEP): see landmark_tile
    l_end = tl.minimum(l0 + LSTEP, L)
    offs_l = l0 + tl.arange(0, BN)
    offs_d = tl.arange(0, DH)
    kl = load_rows(head_base(KL, b, h, L, RS_L, DH), offs_l, l_end, RS_L, DH)
    vl = load_rows(head_base(VL, b, h, L, RS_L, DH), offs_l, l_end, RS_L, DH)
    dt = kl.dtype
    dkl = tl.zeros((BN, DH), dtype=tl.float32)  # unscaled: sum_i dS[i, l] q_i
    dvl = tl.zeros((BN, DH), dtype=tl.float32)
    for i0 in range(landmark_query_start(l0, M, C, R, BM), N, BM):
        offs_i = i0 + tl.arange(0, BM)
        q, do, lse, delta = _query_side(Q, DO, LSE, DELTA, b, h, bh, offs_i, H, N, DH)
        pos, dist, band, rb = landmark_band_t(q, RL + h * ND * DH, offs_i, offs_l, i0, l0, M, ND, C, R, LSTEP, NDL,
                                              DH, PREC)
        st = (tl.dot(kl, tl.trans(q), input_precision=PREC) + pos) * scale
        vis = (dist >= 0) & (offs_l < l_end)[:, None] & (offs_i < N)[None, :]
        pt, dst = _probs_t(st, vis, lse, delta, tl.dot(vl, tl.trans(do), input_precision=PREC))
        dvl += tl.dot(pt.to(dt), do, input_precision=PREC)
        dkl += tl.dot(dst.to(dt), q, input_precision=PREC)
        dsb = landmark_band_grad_t(dst, offs_i, band, l0, M, C, R, BN, BM, NDL).to(dt)
        dq = tl.dot(tl.trans(dst.to(dt)), kl, input_precision=PREC)
        dq = tl.dot(tl.trans(dsb), rb, dq, input_precision=PREC)
        _add_dq(DQ, b, h, offs_i, H, N, dq, scale, DH)
        rows = tl.minimum(tl.maximum(band, 0), ND - 1)  # far distances share the clamp's last row
        tl.atomic_add(DRL + h * ND * DH + rows[:, None] * DH + offs_d[None, :],
                      tl.dot(dsb, q, input_precision=PREC) * scale, mask=(band >= 0)[:, None], sem="relaxed")
    _store_rows(DKL, b, h, offs_l, l_end, L, H, dkl * scale, DH)  # l_end: not the next program's landmarks
    _store_rows(DVL, b, h, offs_l, l_end, L, H, dvl, DH)


def row_dot(out: torch.Tensor, out_lo: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O) in fp32, (B, H, N), O = out + out_lo (the forward's residual; empty for fp32): the
    rounded output alone would shift every dS of a row by P (rowsum(dO * rounding)), which sums like a bias.
    out, out_lo and do token-major contiguous."""
    B, H, N, dh = out.shape
    delta = torch.empty((B, H, N), device=out.device, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(N, DELTA_ROWS), B * H)](out, out_lo, do, delta, H, N, DH=dh,
                                                        HAS_LO=out_lo.numel() > 0, BR=DELTA_ROWS)
    return delta


def bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (3-D, half inputs) accumulated and returned in fp32: cuBLAS's fp32-output GEMM on CUDA (no fp32 copy
    of the inputs); elsewhere (the CPU tests) the same exact products accumulated in fp32."""
    if a.device.type in ("cuda", "meta"):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def long_short_backward(do, q, k_win, v_win, k_lm, v_lm, u, v, r_win, r_lm, out, out_lo, lse, *, window: int,
                        chunk: int, chunk_rank: int, mem_len: int, scale: float,
                        pos_table: bool = False) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk_win, dv_win, dk_lm, dv_lm, du, dv, dr_win, dr_lm); du..dr_lm in fp32, the others
    token-major. Inputs as long_short_forward's, do and out token-major contiguous.

    pos_table: the window position table is rebuilt here (not saved by the forward) and its gradient dQR,
    written by the window kernel, goes to q, v and R_w through two GEMMs."""
    B, H, N, dh = q.shape
    S = k_win.shape[2]
    P = S - N
    L = k_lm.shape[2]
    ND = r_lm.shape[1]
    prec = dot_precision(q.dtype)
    f32 = dict(device=q.device, dtype=torch.float32)
    delta = row_dot(out, out_lo, do)
    dq = empty_token_major(B, H, N, dh, q, torch.float32).zero_()  # scale dL/d(q^), added to by both kernels
    dkw, dvw = empty_token_major(B, H, S, dh, q), empty_token_major(B, H, S, dh, q)
    dkl, dvl = empty_token_major(B, H, L, dh, q), empty_token_major(B, H, L, dh, q)
    drw, drl = torch.zeros((H, window, dh), **f32), torch.zeros((H, ND, dh), **f32)
    nblk = triton.cdiv(S, BIAS_BLOCK_MIN)
    dbias = torch.zeros((2, B, H, nblk, dh), **f32)  # per program: du, then dv (band mode)
    vr = position_bias(v, r_win)
    if pos_table:
        qr = window_pos_table(q, r_win, scale)
        dqr = torch.empty_like(qr)
        dqr[:, :, :max(window - 1 - P, 0)].zero_()  # pairs (i, d) with no key (P + i - d < 0) are never written
    else:
        qr = dqr = q.new_empty(0)  # placeholders the kernels never touch

    _bwd_window_kernel[lambda m: (triton.cdiv(S, m["BN"]), B * H)](
        q, k_win, v_win, u, v, key_bias(k_win, u), r_win, vr, qr, do, lse, delta, dq, dkw, dvw,
        drw, dqr, dbias, scale, H, N, P, window, nblk, row_stride(k_win), DH=dh, POS_TABLE=pos_table, PREC=prec)
    du, dv = dbias.sum((1, 3)).unbind(0)
    if pos_table:
        del qr
        r_t = r_win.expand(B, H, window, dh).reshape(B * H, window, dh)
        dq.add_(bmm_f32(dqr.view(B * H, N, window), r_t).view(B, H, N, dh), alpha=scale)  # scale dQR R_w
        # dR_w = dQR^T (scale q + v) = scale dQR^T q + colsum(dQR) v and dv = colsum(dQR) R_w: one GEMM per batch row
        # against [q | 1 | 0...] (padded to 16 bytes) gives both, in fp32, with no rounded scale q + v.
        q1 = torch.cat([q, q.new_ones(B, H, N, 1), q.new_zeros(B, H, N, 7)], -1)
        g = sum(bmm_f32(dqr[b].transpose(1, 2), q1[b]) for b in range(B))  # (H, w, dh + 8), fixed order
        del q1
        drw += g[..., :dh] * scale + g[..., dh, None] * v.float()[:, None, :]
        dv = dv + torch.matmul(g[:, None, :, dh], r_win.float()).squeeze(1)
    if L:
        _bwd_landmark_kernel[lambda m: (triton.cdiv(L, m["LSTEP"]), B * H)](
            q, k_lm, v_lm, r_lm, do, lse, delta, dq, dkl, dvl, drl, scale, H, N, mem_len, L, ND, chunk, chunk_rank,
            row_stride(k_lm), DH=dh, PREC=prec)
    return dq.to(q.dtype), dkw, dvw, dkl, dvl, du, dv, drw, drl
