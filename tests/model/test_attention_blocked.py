"""The blocked core's hand-written backward, its dropout and selective recomputation (equality with `reference`
itself: tests/model/test_attention.py)."""

from __future__ import annotations

import pytest
import torch
from test_attention import make_inputs

from megatron_ls.model.attention import long_short_attention_blocked, long_short_attention_reference


def _grads(fn, args, grad_out):
    out = fn(*args)
    return (out, *torch.autograd.grad(out, args, grad_out))


@pytest.mark.parametrize("N,M,w,c,r,block,clamp", [
    (16, 8, 8, 4, 2, 4, 1),  # memory shorter than the window, r = 2, clamped distances, block = chunk
    (28, 16, 8, 4, 1, 8, None),  # a partial last block, memory longer than the window
    (20, 0, 8, 4, 1, 8, None),  # no memory, N not a multiple of the block
])
def test_custom_backward_passes_gradcheck(N, M, w, c, r, block, clamp):
    """Finite differences of the float64 core against its hand-written backward, every input."""
    args, kw = make_inputs(1, 2, N, M, w, c, r, dh=4, clamp=clamp)
    torch.autograd.gradcheck(lambda *a: long_short_attention_blocked(*a, **kw, block_size=block, max_scores=64),
                             args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_dropout_gradcheck_with_a_fixed_stream():
    """With the generator reset before each call the masks are fixed: the backward is the forward's derivative."""
    args, kw = make_inputs(1, 2, 16, 8, 8, 4, 1, dh=4)

    def fn(*a):
        torch.manual_seed(3)
        return long_short_attention_blocked(*a, **kw, dropout_p=0.3, block_size=4, max_scores=64)

    torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_dropout_rescales_the_kept_probabilities():
    """With values all one, a row's output is sum(kept p) / (1 - p): 1 on average, not 1 everywhere."""
    args, kw = make_inputs(1, 4, 256, 64, 32, 8, 1, dh=8)
    q, kwin, vwin, klm, vlm, *rest = (a.detach() for a in args)
    out = long_short_attention_blocked(q, kwin, torch.ones_like(vwin), klm, torch.ones_like(vlm), *rest, **kw,
                                       dropout_p=0.25)
    assert out.std() > 0.05 and abs(out.mean().item() - 1) < 0.02
    none = long_short_attention_blocked(q, kwin, torch.ones_like(vwin), klm, torch.ones_like(vlm), *rest, **kw)
    torch.testing.assert_close(none, torch.ones_like(none))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_and_reruns_are_bitwise_equal(dtype):
    """Selective recomputation (probabilities rebuilt in the backward, dropout redrawn from the forward's generator
    state) gives bitwise the output and gradients of the kept path, and a rerun with the same seed does too."""
    args, kw = make_inputs(2, 2, 48, 32, 16, 4, 2, dh=8, dtype=dtype, clamp=3)
    grad_out = torch.randn(2, 2, 48, 8, dtype=dtype)
    results = []
    for recompute in (False, True, False):
        torch.manual_seed(7)
        results.append(_grads(lambda *a, rc=recompute: long_short_attention_blocked(
            *a, **kw, dropout_p=0.2, block_size=8, max_scores=2048, recompute=rc), args, grad_out))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    torch.manual_seed(8)
    different = long_short_attention_blocked(*args, **kw, dropout_p=0.2, block_size=8, max_scores=2048)
    assert not torch.equal(different, results[0][0])


def test_recompute_keeps_nothing_of_score_size():
    N, M, w, c = 256, 256, 32, 8
    args, kw = make_inputs(1, 1, N, M, w, c, 1, dtype=torch.float32)
    sizes = []

    def pack(t):
        sizes.append(t.untyped_storage().nbytes() // t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        long_short_attention_blocked(*args, **kw, recompute=True)
    assert 0 < max(sizes) <= (N + w) * 8  # a (positions, dh) tensor at most: no (positions, scores) one


def test_float32_core_matches_float64_reference_at_paper_geometry():
    """b = w / 4 = 128 with 8 chunks per block, memory longer than the window, several groups."""
    args64, kw = make_inputs(1, 2, 512, 640, 512, 16, 1, dh=16)
    args32 = tuple(a.detach().float().requires_grad_() for a in args64)
    ref = long_short_attention_reference(*args64, **kw)
    out = long_short_attention_blocked(*args32, **kw, max_scores=1 << 20)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, args32, g.float()), torch.autograd.grad(ref, args64, g)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_bad_block_size_and_dropout_are_refused():
    args, kw = make_inputs(1, 2, 32, 16, 16, 4, 1)
    with pytest.raises(ValueError, match="multiple of chunk"):
        long_short_attention_blocked(*args, **kw, block_size=6)
    with pytest.raises(ValueError, match="dropout_p"):
        long_short_attention_blocked(*args, **kw, dropout_p=1.0)


def test_runs_on_the_meta_device():
    """bench/blocked_work.py counts the core's work on the meta device (shapes only, no autocast there)."""
    args, kw = make_inputs(1, 2, 32, 16, 16, 4, 2)
    meta = tuple(torch.empty_like(a, device="meta").requires_grad_() for a in args)
    out = long_short_attention_blocked(*meta, **kw)
    assert out.device.type == "meta" and out.shape == args[0].shape
    out.backward(torch.empty_like(out))
    assert all(a.grad is not None and a.grad.shape == a.shape for a in meta)
