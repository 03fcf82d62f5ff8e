"""bench/lm_floor.py: the lower bound on the one-layer LM's time counts the right products."""

import torch

from bench.blocked_work import account, core_inputs
from bench.lm_floor import product_flops
from megatron_ls.model.attention import long_short_attention_blocked


def test_product_flops_counts_a_linear_forward_and_backward():
    """x (T, a) -> (T, b) with x and the weight trainable: forward, grad input and grad weight, 2 T a b each."""
    T, a, b = 64, 32, 48
    lin = torch.nn.Linear(a, b)
    x = torch.randn(T, a, requires_grad=True)
    assert product_flops(lambda: lin(x).sum().backward()) == 3 * 2 * T * a * b


def test_the_core_counted_on_meta_equals_the_core_run_for_real():
    """lm_floor subtracts the core's products counted on the meta device from the LM's counted for real."""
    B, H, N, M, dh, w, c, r = 1, 2, 64, 32, 8, 16, 4, 1
    args = core_inputs(B, N, M, torch.float32, torch.device("cpu"), H, dh, w, c, r)

    def step():
        long_short_attention_blocked(*args, window=w, chunk=c, chunk_rank=r, mem_len=M).sum().backward()

    counted = account(B, N, M, torch.float32, H=H, dh=dh, w=w, c=c, r=r)["blocked_matmul_flops"]
    assert counted > 0 and product_flops(step) == counted
