"""The fused (Triton) long-short attention core: autograd glue and the public entry point.

The semantics of megatron_ls.model.attention.reference (DESIGN.md §2), its geometry one LongShortGeometry: window
scores (q+u).k_s + (q+v).R_w(t-s), landmark scores q.k_j + q.R_c(d) with d in chunk units,
chunk-causal landmark visibility, ONE softmax (fp32 statistics) over both.
"""

from __future__ import annotations

import torch

from megatron_ls.kernels.availability import autocast_off, window_pos_mode
from megatron_ls.kernels.ls_backward import long_short_backward
from megatron_ls.kernels.ls_forward import long_short_forward, row_stride, token_major
from megatron_ls.kernels.spec import LongShortGeometry, check_shapes


class _LongShortFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_win, v_win, k_lm, v_lm, u, v, r_win, r_lm, window, chunk, chunk_rank, mem_len, scale,
                pos_table):
        geo = dict(window=window, chunk=chunk, chunk_rank=chunk_rank, mem_len=mem_len, scale=scale,
                   pos_table=pos_table)
        out, lse, out_lo = long_short_forward(q, k_win, v_win, k_lm, v_lm, u, v, r_win, r_lm, **geo)
        ctx.save_for_backward(q, k_win, v_win, k_lm, v_lm, u, v, r_win, r_lm, out, out_lo, lse)
        ctx.geo = geo
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k_win, v_win, k_lm, v_lm, u, v, r_win, r_lm, out, out_lo, lse = ctx.saved_tensors
        grads = long_short_backward(token_major(dout, row_stride_free=False), q, k_win, v_win, k_lm, v_lm, u, v,
                                    r_win, r_lm, out, out_lo, lse, **ctx.geo)
        dq, dkw, dvw, dkl, dvl, du, dv, drw, drl = grads
        return (dq, dkw, dvw, dkl, dvl, du.to(u.dtype), dv.to(v.dtype), drw.to(r_win.dtype), drl.to(r_lm.dtype),
                None, None, None, None, None, None)


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return q.dtype


def long_short_attention_fused(
    q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, k_lm: torch.Tensor, v_lm: torch.Tensor,
    pos_bias_u: torch.Tensor, pos_bias_v: torch.Tensor, r_win: torch.Tensor, r_lm: torch.Tensor,
    geo: LongShortGeometry,
) -> torch.Tensor:
    """Long-short attention with Triton kernels for forward and backward; returns (B, H, N, dh).

    The kernels run on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1, tests). There is no
    dropout here: the dispatcher (model/attention/dispatch.py) runs `blocked` for dropout on the probabilities.
    dh must be a power of two >= 16 (tl.dot / tl.arange). Operands are computed in q's dtype (the autocast dtype
    under CUDA autocast); u, v, R and the softmax statistics are accumulated in fp32. Gradients flow to all nine
    tensors.
    """
    check_shapes(q, k_win, v_win, k_lm, v_lm, pos_bias_u, pos_bias_v, r_win, r_lm, geo)
    window, chunk, chunk_rank, mem_len, softmax_scale = (geo.window, geo.chunk, geo.chunk_rank, geo.mem_len,
                                                         geo.softmax_scale)
    dh = q.shape[-1]
    if dh < 16 or dh & (dh - 1):
        raise ValueError(f"the fused kernel needs a head dim that is a power of two >= 16, got {dh}")
    scale = softmax_scale if softmax_scale is not None else dh ** -0.5
    dt = _compute_dtype(q)
    if k_lm.shape[2] == 0:  # window only: the landmark table is never read; keep one valid row
        r_lm = r_lm.new_zeros((q.shape[1], 1, dh)) if r_lm.dim() != 3 or r_lm.shape[1] < 1 else r_lm
    with autocast_off(q):
        # The kernels read the projections' own token-major layout (the layer passes transposed views): no copies.
        args = [token_major(q.to(dt), row_stride_free=False), *_kv_pair(k_win, v_win, dt), *_kv_pair(k_lm, v_lm, dt)]
        args += [pos_bias_u.contiguous(), pos_bias_v.contiguous()]
        args += [t.to(dt).contiguous() for t in (r_win, r_lm)]
        return _LongShortFn.apply(*args, window, chunk, chunk_rank, mem_len, float(scale), window_pos_mode() == "table")


def _kv_pair(k: torch.Tensor, v: torch.Tensor, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values token-major with one row stride (one kernel argument for both)."""
    k, v = token_major(k.to(dt)), token_major(v.to(dt))
    if row_stride(k) != row_stride(v):
        k, v = token_major(k, row_stride_free=False), token_major(v, row_stride_free=False)
    return k, v
