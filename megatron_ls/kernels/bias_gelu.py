"""Fused bias + GELU (exact, erf) for the MLP's first projection: one pass forward, one pass backward.

fc1 runs without its bias (Megatron's skip_bias_add); this kernel adds the bias and applies GELU in
one read and one write, and its backward produces dGELU * dout in one pass (the bias gradient is a
column sum of that). Math in fp32 whatever the storage dtype; same function as F.gelu(y + b).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_ls.kernels.availability import autocast_off

_BLOCK = 1024  # most columns per program; 0.7071... = 1/sqrt(2), 0.3989... = 1/sqrt(2 pi) below


@triton.jit
def _load_biased(Y, B, n_cols, BLOCK: tl.constexpr):
    """(offsets, mask, y + b in fp32) of this program's columns of one row (grid: rows x column blocks)."""
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    offs = tl.program_id(0).to(tl.int64) * n_cols + cols
    x = tl.load(Y + offs, mask=ok, other=0.0).to(tl.float32) + tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
    return offs, ok, x


@triton.jit
def _bias_gelu_fwd_kernel(Y, B, OUT, n_cols, BLOCK: tl.constexpr):
    offs, ok, x = _load_biased(Y, B, n_cols, BLOCK)
    out = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _bias_gelu_bwd_kernel(DOUT, Y, B, DY, n_cols, BLOCK: tl.constexpr):
    offs, ok, x = _load_biased(Y, B, n_cols, BLOCK)
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    dout = tl.load(DOUT + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(DY + offs, (dout * (cdf + x * pdf)).to(DY.dtype.element_ty), mask=ok)


def _launch(kernel, *args: torch.Tensor, n_cols: int) -> None:
    rows = args[0].numel() // max(n_cols, 1)
    block = min(_BLOCK, triton.next_power_of_2(n_cols))
    if rows and n_cols:
        kernel[(rows, triton.cdiv(n_cols, block))](*args, n_cols, BLOCK=block)


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y = y.contiguous()
        out = torch.empty_like(y)
        _launch(_bias_gelu_fwd_kernel, y, bias.contiguous(), out, n_cols=bias.numel())
        ctx.save_for_backward(y, bias)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, bias = ctx.saved_tensors
        dy = torch.empty_like(y)
        _launch(_bias_gelu_bwd_kernel, dout.contiguous(), y, bias.contiguous(), dy, n_cols=bias.numel())
        dbias = dy.reshape(-1, bias.numel()).sum(0, dtype=torch.float32).to(bias.dtype)
        return dy, dbias


def bias_gelu(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(y + bias) with bias broadcast over the last dimension (Triton; CUDA or the interpreter)."""
    if bias.dim() != 1 or y.shape[-1] != bias.numel():
        raise ValueError(f"bias_gelu: bias must be ({y.shape[-1]},) for y {tuple(y.shape)}, got {tuple(bias.shape)}")
    # The bias keeps its dtype (fp32 master under autocast): the kernel reads it in fp32 and its gradient, a sum
    # over every row, is accumulated and returned in fp32.
    with autocast_off(y):
        return _BiasGelu.apply(y, bias)
