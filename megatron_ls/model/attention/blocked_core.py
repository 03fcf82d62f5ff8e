"""The blocked long-short core as one autograd Function with a hand-written backward.

Layout and views: attention/blocked_layout.py. Per group of query blocks the forward writes every score piece into
one buffer, softmaxes it in place and multiplies by the values; it keeps the probabilities (or, under selective
recomputation, nothing but its inputs and output). The backward is FlashAttention's, group by group:

    dP = dO V^T,   dS = P * (dP - delta),  delta_i = dO_i . O_i,   then dQ, dK, dV, dR from dS and P,

where the window-band and landmark-distance gradients are read through the same strided views the forward wrote.
Dropout masks are drawn per group and redrawn in the backward from the generator state of the forward, so no mask
is kept and the recomputed and the kept paths see the same bits.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from megatron_ls.model.attention.blocked_layout import (
    Geometry,
    Group,
    Masks,
    band,
    distance_skew,
    landmark_view,
    mask_tile,
    staircase,
)
from megatron_ls.model.attention.common import softmax_dtype


def _product_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b (batched) for `out` a strided piece of a score buffer.

    On the CPU torch runs a batched product as one MKL batch GEMM only when its output is contiguous; into a strided
    view it makes one small GEMM per batch item, each split over the threads, at under half the rate here (8 x 128
    x 64 x 640: about 47 against 93 GFLOP/s, 2 threads). A contiguous result and one copy cost less."""
    if out.is_contiguous() or out.device.type != "cpu":
        out.baddbmm_(a, b, beta=0)
    else:
        out.copy_(torch.bmm(a, b))


def _softmax_grad(dP: torch.Tensor, P: torch.Tensor, keep: torch.Tensor | None, cols: slice, delta: torch.Tensor,
                  geo: Geometry, dtype: torch.dtype) -> torch.Tensor:
    """dS = P * (dP - delta) in place on dP, for the columns `cols` of the group's probabilities P and dropout mask
    (applied to dP first); delta = rowsum(P * dP) = dO . O, one dot per row instead of a pass over P."""
    P = P[..., cols]
    if keep is not None:
        dP.mul_(keep[..., cols]).mul_(1 / (1 - geo.dropout_p))
    if P.dtype == dtype:
        return dP.sub_(delta[..., None]).mul_(P)
    return dP.to(P.dtype).sub_(delta[..., None]).mul_(P).to(dtype)


class Work(NamedTuple):
    """Block-major working set of one call (see blocked_layout.py)."""

    qs: torch.Tensor  # (blocks, BH, b, dh) scaled queries
    qu: torch.Tensor  # qs + u
    qv: torch.Tensor  # qs + v
    kb: torch.Tensor  # (BH, (blocks + shifts) b, dh) window keys, padded in front: query block s's tile is s b + [0, L)
    vb: torch.Tensor  # window values, the same
    klm: torch.Tensor  # (BH, n_lm, dh)
    vlm: torch.Tensor
    rw: torch.Tensor  # (BH, w, dh) R_w reversed: row e is distance w - 1 - e
    rc: torch.Tensor  # (BH, D, dh) R_c per distance, reversed: row x is distance D - 1 - x


def to_blocks(x: torch.Tensor, b: int, front: int, blocks: int) -> torch.Tensor:
    """(B, H, S, dh) -> (blocks, B*H, b, dh), `front` zero rows first and zero rows after up to blocks * b."""
    B, H, S, dh = x.shape
    x = F.pad(x, (0, 0, front, blocks * b - front - S))
    return x.view(B, H, blocks, b, dh).permute(2, 0, 1, 3, 4).contiguous().view(blocks, B * H, b, dh)


def padded(x: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """Window keys or values (B, H, P + N, dh) -> (B*H, (blocks + shifts) b, dh), `front` zero rows first."""
    B, H, S, dh = x.shape
    rows = (geo.n_blocks + geo.shifts) * geo.b
    return F.pad(x, (0, 0, geo.front, rows - geo.front - S)).view(B * H, rows, dh)


def from_blocks(x: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """(blocks, B*H, b, dh) -> (B, H, blocks * b, dh)."""
    n, _, b, dh = x.shape
    return x.view(n, B, H, b, dh).permute(1, 2, 0, 3, 4).reshape(B, H, n * b, dh)


def _per_bh(x: torch.Tensor, B: int) -> torch.Tensor:
    """Per-head (H, n, dh) -> per (batch, head) (B*H, n, dh); a view for B = 1."""
    return x if B == 1 else x.expand(B, *x.shape).reshape(B * x.shape[0], *x.shape[1:])


def distance_table(r_lm: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """R_c for distances 0 .. D-1 (the last given row repeated: the clamp) and the row index used, if any."""
    n_dist = r_lm.shape[1]
    if n_dist >= D:
        return r_lm[:, :D], None
    idx = torch.arange(D, device=r_lm.device).clamp_(max=n_dist - 1)
    return r_lm.index_select(1, idx), idx


def work(geo: Geometry, qs: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, k_lm: torch.Tensor,
         v_lm: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r_win: torch.Tensor, r_lm: torch.Tensor) -> Work:
    B, BH, dh = geo.B, geo.BH, geo.dh
    rc = _per_bh(distance_table(r_lm, geo.D)[0].flip(1), B) if geo.D else r_lm.new_zeros(BH, 0, dh)
    return Work(qs=qs, qu=qs + _per_bh(u[:, None], B).view(1, BH, 1, dh),
                qv=qs + _per_bh(v[:, None], B).view(1, BH, 1, dh), kb=kb, vb=vb,
                klm=k_lm.reshape(BH, geo.n_lm, dh), vlm=v_lm.reshape(BH, geo.n_lm, dh),
                rw=_per_bh(r_win.flip(1), B), rc=rc)


def scores(t: Work, geo: Geometry, grp: Group, masks: Masks) -> torch.Tensor:
    """Masked joint scores of one group: (g, BH, rows, n_vis + L), landmarks first, then the window tile."""
    g, rows, BH, b = grp.g, grp.rows, geo.BH, geo.b
    n_vis = grp.qmax * geo.r
    s = slice(grp.s0, grp.s0 + g)
    S = t.qs.new_empty(g, BH, rows, n_vis + geo.L)
    # Window content, (q + u) . k: query block s against its tile, keys s b .. s b + L - 1.
    qu = t.qu[s, :, :rows]
    for gi in range(g):
        s0 = (grp.s0 + gi) * b
        _product_into(S[gi, :, :, n_vis:], qu[gi], t.kb[:, s0: s0 + geo.L].transpose(1, 2))
    # Window position, (q + v) . R_w(d), added along the band.
    bands = band(S, geo, grp, n_vis)
    qv = t.qv[s, :, :rows]
    rw_t = t.rw.transpose(1, 2)
    for gi in range(g):
        bands[gi * BH: (gi + 1) * BH].baddbmm_(qv[gi], rw_t)
    mask_tile(S, geo, grp, n_vis, masks)
    if n_vis:
        qs = t.qs[s, :, :rows]
        klm_t = t.klm[:, :n_vis].transpose(1, 2)
        rc_t = t.rc[:, geo.D - grp.qmax:].transpose(1, 2)  # distances qmax - 1 .. 0
        A = S.new_empty(g, BH, rows, grp.qmax)
        for gi in range(g):
            _product_into(S[gi, :, :, :n_vis], qs[gi], klm_t)
            A[gi].baddbmm_(qs[gi], rc_t, beta=0)
        landmark_view(S, geo, grp).add_(distance_skew(A, geo, grp, grp.qmax, geo.r))
        if grp.qmax > grp.q0:
            S[..., grp.q0 * geo.r: n_vis].masked_fill_(staircase(geo, grp, S.device), geo.neg)
    return S


def probabilities(t: Work, geo: Geometry, grp: Group, masks: Masks) -> torch.Tensor:
    """Softmax of `scores` (in place for fp32 / fp64; fp32 for half types)."""
    S = scores(t, geo, grp, masks)
    if S.dtype != softmax_dtype(S.dtype):
        return torch.softmax(S.to(softmax_dtype(S.dtype)), dim=-1)
    return torch.ops.aten._softmax.out(S, -1, False, out=S)


def draw_keep(P: torch.Tensor, geo: Geometry) -> torch.Tensor | None:
    """The dropout keep mask of one group (None without dropout): one draw of the generator per group, in order."""
    if geo.dropout_p == 0:
        return None
    return torch.empty(P.shape, dtype=torch.bool, device=P.device).bernoulli_(1 - geo.dropout_p)


def dropped(P: torch.Tensor, keep: torch.Tensor | None, geo: Geometry, dtype: torch.dtype) -> torch.Tensor:
    """The probabilities that multiply the values: dropout applied, in the values' dtype (P itself if nothing to do)."""
    if keep is None:
        return P.to(dtype)
    return (P * keep).mul_(1 / (1 - geo.dropout_p)).to(dtype)


def output(t: Work, geo: Geometry, grp: Group, Pd: torch.Tensor, ob: torch.Tensor) -> None:
    """ob[blocks of grp] = Pd @ [landmark values ; window values]."""
    g, rows = grp.g, grp.rows
    n_vis = grp.qmax * geo.r
    o = ob[grp.s0: grp.s0 + g, :, :rows]
    for gi in range(g):
        s0 = (grp.s0 + gi) * geo.b
        o[gi].baddbmm_(Pd[gi, :, :, n_vis:], t.vb[:, s0: s0 + geo.L], beta=0)
        if n_vis:
            o[gi].baddbmm_(Pd[gi, :, :, :n_vis], t.vlm[:, :n_vis])


class Grads(NamedTuple):
    dqs: torch.Tensor  # block-major, like Work.qs
    dqu: torch.Tensor
    dqv: torch.Tensor
    dkb: torch.Tensor
    dvb: torch.Tensor
    dklm: torch.Tensor
    dvlm: torch.Tensor
    drw: torch.Tensor
    drc: torch.Tensor


def group_backward(t: Work, geo: Geometry, grp: Group, P: torch.Tensor, keep: torch.Tensor | None,
                   dob: torch.Tensor, delta: torch.Tensor, d: Grads) -> None:
    g, rows, BH, b, L, r = grp.g, grp.rows, geo.BH, geo.b, geo.L, geo.r
    n_vis = grp.qmax * r
    s = slice(grp.s0, grp.s0 + g)
    dtype = t.qs.dtype
    dO = dob[s, :, :rows]
    Pd = dropped(P, keep, geo, dtype)
    tiles = [slice((grp.s0 + gi) * b, (grp.s0 + gi) * b + L) for gi in range(g)]
    # dP = dO [landmark values ; window values]^T in two buffers, window and landmarks, each written whole by
    # its products (a contiguous output: see _product_into), then turned into dS in place.
    dP_win = dO.new_empty(g, BH, rows, L)
    dP_lm = dO.new_empty(g, BH, rows, n_vis)
    for gi, tile in enumerate(tiles):
        dP_win[gi].baddbmm_(dO[gi], t.vb[:, tile].transpose(1, 2), beta=0)
        if n_vis:
            dP_lm[gi].baddbmm_(dO[gi], t.vlm[:, :n_vis].transpose(1, 2), beta=0)
    dS_win = _softmax_grad(dP_win, P, keep, slice(n_vis, None), delta[s, :, :rows], geo, dtype)
    # Values, window keys and (q + u), window position through the band: per query block.
    qu, qv = t.qu[s, :, :rows], t.qv[s, :, :rows]
    dA = band(dS_win, geo, grp, 0)
    for gi, tile in enumerate(tiles):
        d.dvb[:, tile].baddbmm_(Pd[gi, :, :, n_vis:].transpose(1, 2), dO[gi])
        d.dkb[:, tile].baddbmm_(dS_win[gi].transpose(1, 2), qu[gi])
        d.dqu[grp.s0 + gi, :, :rows].baddbmm_(dS_win[gi], t.kb[:, tile], beta=0)
        dA_g = dA[gi * BH: (gi + 1) * BH]
        d.dqv[grp.s0 + gi, :, :rows].baddbmm_(dA_g, t.rw, beta=0)
        d.drw.baddbmm_(dA_g.transpose(1, 2), qv[gi])
    dqs = d.dqs[s, :, :rows]
    if not n_vis:
        dqs.zero_()
        return
    # Landmarks: content, then the distance term gathered back into distance order through the skewed view.
    qs = t.qs[s, :, :rows]
    dS_lm = _softmax_grad(dP_lm, P, keep, slice(None, n_vis), delta[s, :, :rows], geo, dtype)
    dS_chunk = dS_lm if r == 1 else dS_lm.unflatten(-1, (grp.qmax, r)).sum(-1)  # per landmark chunk
    width = 2 * grp.qmax - grp.q0
    dA_lm = dS_lm.new_empty(g, BH, rows, width)
    dA_lm[..., : grp.qmax - grp.q0].zero_()
    distance_skew(dA_lm, geo, grp, width, 1).copy_(dS_chunk.unflatten(2, (rows // geo.c, geo.c)).unsqueeze(-1))
    dA_lm = dA_lm[..., : grp.qmax]
    rc = t.rc[:, geo.D - grp.qmax:]
    for gi in range(g):
        dS_g = dS_lm[gi]
        d.dvlm[:, :n_vis].baddbmm_(Pd[gi, :, :, :n_vis].transpose(1, 2), dO[gi])
        dqs[gi].baddbmm_(dS_g, t.klm[:, :n_vis], beta=0)
        dqs[gi].baddbmm_(dA_lm[gi], rc)
        d.dklm[:, :n_vis].baddbmm_(dS_g.transpose(1, 2), qs[gi])
        d.drc[:, geo.D - grp.qmax:].baddbmm_(dA_lm[gi].transpose(1, 2), qs[gi])


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextlib.contextmanager
def _replay_rng(device: torch.device, state: torch.Tensor | None):
    """Within: the generator state the forward had (for the same dropout masks); after: as before."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


class BlockedCore(torch.autograd.Function):
    """(geometry, recompute, q, k_win, v_win, k_lm, v_lm, u, v, r_win, r_lm) -> (B, H, N, dh); see blocked.py."""

    @staticmethod
    def forward(ctx, geo: Geometry, recompute: bool, q, k_win, v_win, k_lm, v_lm, u, v, r_win, r_lm):
        B, H, nb = geo.B, geo.H, geo.n_blocks
        qs = to_blocks(q * geo.scale, geo.b, 0, nb)
        kb = padded(k_win, geo)
        vb = padded(v_win, geo)
        t = work(geo, qs, kb, vb, k_lm, v_lm, u, v, r_win, r_lm)
        masks = Masks.build(geo, q.device)
        keep_probs = any(ctx.needs_input_grad) and not recompute
        ctx.rng = _rng_state(q.device) if geo.dropout_p > 0 else None
        ob = q.new_empty(nb, geo.BH, geo.b, geo.dh)
        kept = []
        for grp in geo.groups:
            P = probabilities(t, geo, grp, masks)
            output(t, geo, grp, dropped(P, draw_keep(P, geo), geo, q.dtype), ob)
            if keep_probs:
                kept.append(P)
        ctx.geo = geo
        ctx.save_for_backward(qs, kb, vb, k_lm, v_lm, u, v, r_win, r_lm, ob, *kept)
        return from_blocks(ob, B, H)[:, :, : geo.N]

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        geo: Geometry = ctx.geo
        qs, kb, vb, k_lm, v_lm, u, v, r_win, r_lm, ob, *kept = ctx.saved_tensors
        B, H, N, dh, nb = geo.B, geo.H, geo.N, geo.dh, geo.n_blocks
        t = work(geo, qs, kb, vb, k_lm, v_lm, u, v, r_win, r_lm)
        masks = Masks.build(geo, qs.device)
        dob = to_blocks(dout.to(qs.dtype), geo.b, 0, nb)
        st = softmax_dtype(qs.dtype)
        delta = (dob.to(st) * ob.to(st)).sum(-1)
        d = Grads(dqs=torch.empty_like(qs), dqu=torch.empty_like(qs), dqv=torch.empty_like(qs),
                  dkb=torch.zeros_like(kb), dvb=torch.zeros_like(vb), dklm=torch.zeros_like(t.klm),
                  dvlm=torch.zeros_like(t.vlm), drw=torch.zeros_like(t.rw), drc=torch.zeros_like(t.rc))
        with _replay_rng(qs.device, ctx.rng):
            for i, grp in enumerate(geo.groups):
                P = kept[i] if kept else probabilities(t, geo, grp, masks)
                group_backward(t, geo, grp, P, draw_keep(P, geo), dob, delta, d)
        dq = from_blocks((d.dqs + d.dqu).add_(d.dqv), B, H)[:, :, :N] * geo.scale
        du = from_blocks(d.dqu, B, H)[:, :, :N].sum((0, 2))
        dv = from_blocks(d.dqv, B, H)[:, :, :N].sum((0, 2))
        window_keys = slice(geo.front, geo.front + geo.P + N)
        dk_win = d.dkb.view(B, H, -1, dh)[:, :, window_keys]
        dv_win = d.dvb.view(B, H, -1, dh)[:, :, window_keys]
        dk_lm = d.dklm.view(B, H, geo.n_lm, dh)
        dv_lm = d.dvlm.view(B, H, geo.n_lm, dh)
        dr_win = d.drw.view(B, H, geo.w, dh).sum(0).flip(1)
        dr_lm = torch.zeros_like(r_lm)
        if geo.D:
            per_distance = d.drc.view(B, H, geo.D, dh).sum(0).flip(1)
            idx = distance_table(r_lm, geo.D)[1]
            if idx is None:
                dr_lm[:, : geo.D] = per_distance
            else:
                dr_lm.index_add_(1, idx, per_distance)
        return None, None, dq, dk_win, dv_win, dk_lm, dv_lm, du, dv, dr_win, dr_lm
