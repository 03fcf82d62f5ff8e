"""The long-short attention core: a naive per-query oracle, reference, blocked, baselines, dispatch."""

from __future__ import annotations

import pytest
import torch

from megatron_ls.model.attention import (
    full_attention,
    full_attention_dense,
    landmark_distance_rows,
    long_short_attention,
    long_short_attention_blocked,
    long_short_attention_reference,
    resolve_impl,
)


def make_inputs(B, H, N, M, w, c, r, dh=8, clamp=None, landmarks=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = min(M, w - 1)
    n_lm = (M + N) // c * r if landmarks else 0
    n_dist = landmark_distance_rows((M + N) // c, clamp)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    args = (t(B, H, N, dh), t(B, H, P + N, dh), t(B, H, P + N, dh), t(B, H, n_lm, dh), t(B, H, n_lm, dh),
            t(H, dh), t(H, dh), t(H, w, dh), t(H, n_dist, dh))
    return args, dict(window=w, chunk=c, chunk_rank=r, mem_len=M)


def naive(q, k_win, v_win, k_lm, v_lm, u, v, r_win, r_lm, *, window, chunk, chunk_rank, mem_len):
    """One query at a time, straight from the written semantics (DESIGN.md section 2)."""
    B, H, N, dh = q.shape
    P = k_win.shape[2] - N
    out = torch.zeros_like(q)
    for i in range(N):
        t = mem_len + i
        qs = q[:, :, i] * dh ** -0.5
        scores, values = [], []
        for lm in range(k_lm.shape[2]):
            j = lm // chunk_rank
            if j < t // chunk:
                d = min(t // chunk - 1 - j, r_lm.shape[1] - 1)
                scores.append((qs * (k_lm[:, :, lm] + r_lm[:, d])).sum(-1))
                values.append(v_lm[:, :, lm])
        for s in range(max(0, t - window + 1), t + 1):
            idx = s - (mem_len - P)
            scores.append(((qs + u) * k_win[:, :, idx]).sum(-1) + ((qs + v) * r_win[:, t - s]).sum(-1))
            values.append(v_win[:, :, idx])
        p = torch.softmax(torch.stack(scores, -1), -1)
        out[:, :, i] = (p.unsqueeze(-1) * torch.stack(values, -2)).sum(-2)
    return out


# (N, M, w, c, r, block, clamp, landmarks)
CASES = [
    (64, 0, 16, 4, 1, None, None, True),  # no memory
    (32, 64, 16, 8, 2, None, None, True),  # memory longer than the window, r > 1
    (8, 16, 16, 4, 1, None, None, True),  # N < w
    (40, 24, 16, 4, 3, None, None, True),  # N not a multiple of w or of the block, r = 3
    (48, 32, 16, 4, 2, 12, 2, True),  # block not dividing w (12 of 16), clamped landmark distance
    (24, 8, 16, 4, 1, 20, None, True),  # memory shorter than w - 1, a partial last block
    (32, 16, 16, 4, 1, 4, None, True),  # block = chunk
    (40, 64, 16, 8, 1, None, None, False),  # window only
]


@pytest.mark.parametrize("N,M,w,c,r,block,clamp,landmarks", CASES)
def test_reference_matches_naive(N, M, w, c, r, block, clamp, landmarks):
    args, kw = make_inputs(1, 2, N, M, w, c, r, clamp=clamp, landmarks=landmarks)
    torch.testing.assert_close(long_short_attention_reference(*args, **kw), naive(*args, **kw))


@pytest.mark.parametrize("N,M,w,c,r,block,clamp,landmarks", CASES)
def test_blocked_matches_reference_forward_and_gradients(N, M, w, c, r, block, clamp, landmarks):
    args, kw = make_inputs(2, 2, N, M, w, c, r, clamp=clamp, landmarks=landmarks)
    ref = long_short_attention_reference(*args, **kw)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, args, grad_out, allow_unused=True)
    # max_scores=1 forces one block per group: the grouping path must agree too.
    for max_scores in (1 << 26, 1):
        out = long_short_attention_blocked(*args, **kw, block_size=block, max_scores=max_scores)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        grads = torch.autograd.grad(out, args, grad_out, allow_unused=True)
        for name, g, gr in zip("q k_win v_win k_lm v_lm u v r_win r_lm".split(), grads, ref_grads):
            if gr is None:
                assert g is None or not g.any(), name
            else:
                torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-10, msg=name)


def test_blocked_float32_within_rounding_of_float64_reference():
    args64, kw = make_inputs(1, 4, 96, 64, 32, 8, 2, dh=16)
    args32 = tuple(a.detach().float().requires_grad_() for a in args64)
    ref = long_short_attention_reference(*args64, **kw)
    out = long_short_attention_blocked(*args32, **kw)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, args32, g.float()), torch.autograd.grad(ref, args64, g)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["reference", "blocked"])
def test_core_causality_bitwise(impl):
    """Perturbing everything at or after chunk boundary t leaves outputs before t bitwise equal."""
    N, M, w, c, r = 48, 32, 16, 4, 2
    args, kw = make_inputs(1, 2, N, M, w, c, r, dtype=torch.float32)
    base = long_short_attention(*args, **kw, impl=impl)
    t = 21  # a query in the middle of a chunk: later window keys and its own chunk's landmark change
    q, kwin, vwin, klm, vlm, *rest = [a.detach().clone() for a in args]
    P = kwin.shape[2] - N
    kwin[:, :, P + t + 1:] += 1.0
    vwin[:, :, P + t + 1:] -= 2.0
    first_hidden_chunk = (M + t) // c  # the query's own chunk and later ones: landmarks invisible
    klm[:, :, first_hidden_chunk * r:] *= 3.0
    vlm[:, :, first_hidden_chunk * r:] += 5.0
    q[:, :, t + 1:] = 7.0
    out = long_short_attention(q, kwin, vwin, klm, vlm, *rest, **kw, impl=impl)
    assert torch.equal(out[:, :, : t + 1], base.detach()[:, :, : t + 1])
    assert not torch.equal(out[:, :, t + 1:], base.detach()[:, :, t + 1:])


def test_full_attention_matches_dense():
    g = torch.Generator().manual_seed(1)
    for P in (0, 24):
        q = torch.randn(2, 3, 16, 8, generator=g, dtype=torch.float64)
        k = torch.randn(2, 3, P + 16, 8, generator=g, dtype=torch.float64)
        v = torch.randn(2, 3, P + 16, 8, generator=g, dtype=torch.float64)
        torch.testing.assert_close(full_attention(q, k, v), full_attention_dense(q, k, v))


def test_window_baseline_matches_dense_band():
    """Window-only attention equals a dense softmax over a banded mask (no landmarks at all)."""
    N, M, w = 40, 24, 16
    args, kw = make_inputs(1, 2, N, M, w, 8, 1, landmarks=False)
    q, k, v, _, _, u, bv, r_win, _ = args
    P = k.shape[2] - N
    dist = (P + torch.arange(N))[:, None] - torch.arange(P + N)[None, :]
    band = (dist >= 0) & (dist < w)
    qs = q * 8 ** -0.5
    pos = torch.matmul(qs + bv[:, None], r_win.transpose(-1, -2)).gather(-1, dist.clamp(0, w - 1).expand(1, 2, N, -1))
    scores = (torch.matmul(qs + u[:, None], k.transpose(-1, -2)) + pos).masked_fill(~band, float("-inf"))
    dense = torch.matmul(torch.softmax(scores, -1), v)
    torch.testing.assert_close(long_short_attention_blocked(*args, **kw), dense)


def test_shape_errors_name_the_problem():
    args, kw = make_inputs(1, 2, 32, 16, 16, 4, 1)
    with pytest.raises(ValueError, match="k_win"):
        long_short_attention_blocked(*args, **{**kw, "mem_len": 8})
    with pytest.raises(ValueError, match="landmarks"):
        long_short_attention_blocked(*args, **{**kw, "chunk_rank": 2})


def test_dispatch():
    assert resolve_impl("auto", torch.device("cpu")) == "blocked"
    assert resolve_impl("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="attention_impl"):
        resolve_impl("flash", torch.device("cpu"))
    try:
        from megatron_ls.kernels import long_short_attention_fused  # noqa: F401
    except ImportError:
        args, kw = make_inputs(1, 2, 16, 0, 8, 4, 1)
        with pytest.raises(NotImplementedError, match="fused"):
            long_short_attention(*args, **kw, impl="fused")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blocked_half_precision_masks_without_overflow(dtype):
    """Finite masking values survive half types: no inf/NaN; relative error (norm) < 1e-2 vs fp64."""
    args64, kw = make_inputs(1, 2, 64, 32, 16, 4, 2, dh=16)
    half = tuple(a.detach().to(dtype).requires_grad_() for a in args64)
    out = long_short_attention_blocked(*half, **kw)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(a.grad).all() for a in half)
    ref = long_short_attention_reference(*(a.detach().to(dtype).double() for a in args64), **kw)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_model_under_bf16_autocast():
    from megatron_ls.model import TransformerLSConfig, TransformerLSLM

    torch.manual_seed(0)
    cfg = TransformerLSConfig(vocab_size=256, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                              window_size=32, chunk_size=8, chunk_rank=2, mem_length=64, dropout=0.0,
                              attention_impl="blocked")
    m = TransformerLSLM(cfg)
    tokens = torch.randint(0, 256, (2, 64))
    loss32, memory = m(tokens, labels=tokens)
    loss32, _ = m(tokens, memory, labels=tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, memory16 = m(tokens, labels=tokens)
        loss16, _ = m(tokens, memory16, labels=tokens)
    loss16.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    torch.testing.assert_close(loss16, loss32, rtol=0, atol=5e-2)


def test_blocked_never_materialises_the_full_score_matrix():
    """Every tensor kept for the backward is smaller than one head's N x (M+N) dense scores."""
    N, M, w, c = 256, 256, 16, 8
    args, kw = make_inputs(1, 1, N, M, w, c, 1, dtype=torch.float32)
    largest = 0

    def pack(t):
        nonlocal largest
        largest = max(largest, t.untyped_storage().nbytes() // t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        long_short_attention_blocked(*args, **kw)
    assert 0 < largest < N * (M + N) // 2


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on the CPU, as meant
@pytest.mark.parametrize("n,s,w", [(64, 64, 16), (32, 96, 24), (48, 48, 100)])
def test_flexattention_sliding_window_is_the_window_it_names(n, s, w):
    """bench/attention.py's `window` row: query i (at key position s - n + i) sees keys s - n + i - w < j <= s - n + i.
    Forward only: FlexAttention has no CPU backward (the benchmark runs it on CUDA, compiled)."""
    from megatron_ls.model.attention.sliding_window import sliding_window_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, 16, generator=g) for length in (n, s, s))
    t = torch.arange(n)[:, None] + (s - n)
    visible = (torch.arange(s)[None, :] <= t) & (torch.arange(s)[None, :] > t - w)
    scores = (q @ k.transpose(-1, -2) * 16 ** -0.5).masked_fill(~visible, float("-inf"))
    torch.testing.assert_close(sliding_window_attention(q, k, v, window=w), torch.softmax(scores, -1) @ v)
