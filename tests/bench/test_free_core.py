"""bench/free_core.py: the LM's time outside its core is measured with a core that does nothing but pass through."""

import pytest
import torch

import megatron_ls.model.attention.blocked as blocked
from bench.blocked_work import core_inputs
from bench.free_core import free_core
from megatron_ls.model.attention import long_short_attention_blocked

B, H, N, M, dh, w, c, r = 1, 2, 64, 32, 8, 16, 4, 1


def core(args):
    return long_short_attention_blocked(*args, window=w, chunk=c, chunk_rank=r, mem_len=M)


def test_free_core_passes_queries_through_and_every_input_gets_a_gradient():
    args = core_inputs(B, N, M, torch.float32, torch.device("cpu"), H, dh, w, c, r)
    dout = torch.randn(B, H, N, dh)
    with free_core():
        out = core(args)
        out.backward(dout)
    assert torch.equal(out, args[0])
    assert torch.equal(args[0].grad, dout)
    for t in args[1:]:  # the projections behind them still run their backward
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_the_real_core_comes_back_after_the_context_even_on_an_error():
    real = blocked.BlockedCore
    with pytest.raises(RuntimeError, match="inside"), free_core():
        raise RuntimeError("inside")
    assert blocked.BlockedCore is real
    args = core_inputs(B, N, M, torch.float32, torch.device("cpu"), H, dh, w, c, r)
    assert not torch.equal(core(args), args[0])
