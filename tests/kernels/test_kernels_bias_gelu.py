"""The fused bias + GELU kernel against F.gelu(y + b): values and both gradients.

Without CUDA it runs under Triton's interpreter (TRITON_INTERPRET=1, set by conftest before the
kernels are imported); with CUDA it is compiled and checked in bf16 and inside the MLP too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the fused kernels are written in Triton")

from megatron_ls.kernels.availability import fused_available  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernel, bf16)")
pytestmark = pytest.mark.skipif(not fused_available(DEVICE), reason="Triton can run neither on CUDA nor interpreted")


def _grads(fn, y, b, g):
    y, b = y.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    out = fn(y, b)
    return (out, *torch.autograd.grad(out, (y, b), g))


@pytest.mark.parametrize("shape", [(2, 7, 48), (3, 2500), (1, 1, 16)])  # 2500 columns: 3 blocks, last ragged
def test_bias_gelu_matches_gelu_of_sum(shape):
    from megatron_ls.kernels.bias_gelu import bias_gelu

    gen = torch.Generator().manual_seed(0)
    y = (torch.randn(shape, generator=gen) * 3).to(DEVICE)  # wide range: both tails of erf
    b = torch.randn(shape[-1], generator=gen).to(DEVICE)
    g = torch.randn(shape, generator=gen).to(DEVICE)
    out, dy, db = _grads(bias_gelu, y, b, g)
    ref, rdy, rdb = _grads(lambda a, c: F.gelu(a + c), y, b, g)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dy, rdy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db, rdb, atol=1e-4, rtol=1e-5)


def test_bias_gelu_rejects_a_bias_of_the_wrong_size():
    from megatron_ls.kernels.bias_gelu import bias_gelu

    with pytest.raises(ValueError, match=r"bias must be \(8,\)"):
        bias_gelu(torch.zeros(2, 8, device=DEVICE), torch.zeros(7, device=DEVICE))


def test_bias_gelu_empty_input():
    from megatron_ls.kernels.bias_gelu import bias_gelu

    y = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    b = torch.zeros(8, device=DEVICE, requires_grad=True)
    bias_gelu(y, b).sum().backward()
    assert y.grad.shape == (0, 8) and torch.equal(b.grad, torch.zeros(8, device=DEVICE))


@needs_cuda
def test_bias_gelu_bf16_with_fp32_bias_cuda():
    from megatron_ls.kernels.bias_gelu import bias_gelu

    gen = torch.Generator().manual_seed(1)
    y32 = torch.randn(4, 512, 2048, generator=gen).cuda()
    b = torch.randn(2048, generator=gen).cuda()
    g = torch.randn(y32.shape, generator=gen).cuda()
    out, dy, db = _grads(bias_gelu, y32.bfloat16(), b, g.bfloat16())
    ref, rdy, rdb = _grads(lambda a, c: F.gelu(a + c), y32.bfloat16().float(), b, g.bfloat16().float())
    assert out.dtype == dy.dtype == torch.bfloat16 and db.dtype == torch.float32
    for got, want in ((out, ref), (dy, rdy), (db, rdb)):
        assert ((got.float() - want).norm() / want.norm()).item() < 1e-2


@needs_cuda
def test_mlp_fused_path_equals_unfused_cuda():
    from megatron_ls.model import TransformerLSConfig
    from megatron_ls.model.mlp import MLP
    from megatron_ls.parallel import mpu

    mpu.destroy_model_parallel()  # one process: sizes 1 without a process group
    torch.manual_seed(0)
    cfg = TransformerLSConfig(hidden_size=64, num_attention_heads=2, ffn_hidden_size=256, num_layers=1,
                              window_size=16, chunk_size=8, dropout=0.0, seq_length=32)
    mlp = MLP(cfg)
    x = torch.randn(2, 32, 64)
    want = mlp(x)  # CPU: F.linear with bias, then F.gelu
    got = mlp.cuda()(x.cuda())  # CUDA: fc1 without bias, then the fused kernel
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
