"""The LM: config validation, presets, causality, memory across segments, landmarks, losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_ls.model import TransformerLSConfig, TransformerLSLM
from megatron_ls.model.landmarks import compress_landmarks
from megatron_ls.model.layer import TransformerLSLayer


def tiny(**overrides) -> TransformerLSConfig:
    base = dict(vocab_size=27, num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                window_size=16, chunk_size=4, chunk_rank=2, mem_length=32, dropout=0.0,
                attention_impl="blocked")
    return TransformerLSConfig(**{**base, **overrides})


def model(seed: int = 0, **overrides) -> TransformerLSLM:
    torch.manual_seed(seed)
    return TransformerLSLM(tiny(**overrides)).double().eval()


# ---- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,target", [("enwik8-12l", 44.3e6), ("enwik8-30l", 110.6e6)])
def test_preset_parameter_counts(name, target):
    with torch.device("meta"):
        m = TransformerLSLM(TransformerLSConfig.from_preset(name))
    assert abs(m.num_parameters() - target) / target < 0.01, m.num_parameters()


def test_text8_preset_and_overrides():
    cfg = TransformerLSConfig.from_preset("text8-12l", seq_length=4096, mem_length=4096)
    assert (cfg.vocab_size, cfg.seq_length, cfg.num_layers) == (27, 4096, 12)


@pytest.mark.parametrize("overrides,name", [
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(seq_length=30), "seq_length"),
    (dict(mem_length=30), "mem_length"),
    (dict(window_size=2), "window_size"),
    (dict(attention_type="sparse"), "attention_type"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(dropout=1.5), "dropout"),
    (dict(chunk_rank=0), "chunk_rank"),
])
def test_bad_config_names_the_parameter(overrides, name):
    with pytest.raises(ValueError, match=name):
        tiny(**overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        TransformerLSConfig.from_preset("enwik9-99l")


def test_segment_not_multiple_of_chunk_fails():
    with pytest.raises(ValueError, match="chunk_size"):
        model()(torch.zeros(1, 10, dtype=torch.long))


def test_config_round_trip_and_padded_vocab():
    cfg = tiny(max_landmark_distance=3)
    assert TransformerLSConfig.from_dict(cfg.to_dict()) == cfg
    assert (cfg.padded_vocab_size(1), cfg.padded_vocab_size(2), cfg.padded_vocab_size(4)) == (27, 28, 28)
    with pytest.raises(ValueError, match="unknown"):
        TransformerLSConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# ---- causality --------------------------------------------------------------------------------

@pytest.mark.parametrize("attention_type,impl", [("long-short", "blocked"), ("long-short", "reference"),
                                                 ("window", "blocked"), ("full", "blocked")])
def test_causality_bitwise_and_zero_gradients(attention_type, impl):
    m = TransformerLSLM(tiny(attention_type=attention_type, attention_impl=impl)).eval()
    torch.manual_seed(1)
    prefix = torch.randint(0, 27, (2, 32))
    _, memory = m(prefix)  # causality must hold with memory too
    tokens = torch.randint(0, 27, (2, 48))
    t = 21
    changed = tokens.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 5) % 27
    a, _ = m(tokens, memory)
    b, _ = m(changed, memory)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.equal(a[:, t + 1:], b[:, t + 1:])

    layer = m.layers[0]
    x = torch.randn(2, 48, 32, requires_grad=True)
    out = layer(x, memory[0])
    out[:, t].sum().backward()
    assert torch.count_nonzero(x.grad[:, t + 1:]) == 0
    assert torch.count_nonzero(x.grad[:, t]) > 0


@pytest.mark.parametrize("attention_type,impl", [("long-short", "blocked"), ("long-short", "reference"),
                                                 ("window", "blocked"), ("full", "blocked")])
def test_whole_lm_gradients_to_later_inputs_are_exactly_zero(attention_type, impl):
    """Through every layer (and the memory of a previous segment): d logits[t] / d input[s] == 0 exactly for s > t,
    for t at chunk starts, chunk ends and in between."""
    m = TransformerLSLM(tiny(attention_type=attention_type, attention_impl=impl)).eval()
    torch.manual_seed(4)
    _, memory = m(torch.randint(0, 27, (2, 32)))
    tokens = torch.randint(0, 27, (2, 48))
    seen = []
    m.embedding_dropout.register_forward_hook(lambda _m, _i, out: seen.append(out) or out.retain_grad())
    for t in (0, 3, 4, 21, 31, 46):
        seen.clear()
        m.zero_grad()
        logits, _ = m(tokens, memory)
        (emb,) = seen
        logits[:, t].sum().backward()
        assert torch.count_nonzero(emb.grad[:, t + 1:]) == 0, t
        assert torch.count_nonzero(emb.grad[:, t]) > 0, t


# ---- memory -----------------------------------------------------------------------------------

def run_segments(m, tokens, n):
    memory, outs, lengths = None, [], []
    for s in range(0, tokens.shape[1], n):
        lengths.append(0 if memory is None else memory[0].shape[1])
        logits, memory = m(tokens[:, s:s + n], memory)
        outs.append(logits)
    return torch.cat(outs, dim=1), lengths


@pytest.mark.parametrize("attention_type", ["long-short", "full"])
def test_segments_with_memory_equal_one_long_segment(attention_type):
    # Memory holding the whole stream so far: every position sees its full context.
    m = model(attention_type=attention_type, mem_length=64, max_landmark_distance=None)
    tokens = torch.randint(0, 27, (2, 80), generator=torch.Generator().manual_seed(2))
    whole, _ = m(tokens)
    segmented, lengths = run_segments(m, tokens, 16)
    assert lengths == [0, 16, 32, 48, 64]
    # Positions 0..79: all contexts fit until the stream exceeds mem + segment (64 + 16 = 80).
    torch.testing.assert_close(segmented, whole, rtol=1e-10, atol=1e-10)


def test_short_memory_matches_long_segment_where_context_fits():
    # Window-only layers see w - 1 = 15 earlier positions per layer; a 16-token memory holds them,
    # so every position of a long stream matches, although the stream is 5 times the memory.
    m = model(attention_type="window", mem_length=16)
    tokens = torch.randint(0, 27, (1, 80), generator=torch.Generator().manual_seed(3))
    whole, _ = m(tokens)
    segmented, lengths = run_segments(m, tokens, 16)
    assert lengths == [0, 16, 16, 16, 16]
    torch.testing.assert_close(segmented, whole, rtol=1e-10, atol=1e-10)


def test_long_short_memory_truncation():
    # With memory shorter than the stream, positions whose context fits agree (the first two
    # segments) and later ones differ: old chunks' landmarks have left the memory.
    m = model(mem_length=16)
    tokens = torch.randint(0, 27, (1, 48), generator=torch.Generator().manual_seed(4))
    whole, _ = m(tokens)
    segmented, lengths = run_segments(m, tokens, 16)
    assert lengths == [0, 16, 16]
    torch.testing.assert_close(segmented[:, :32], whole[:, :32], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(segmented[:, 32:], whole[:, 32:])


def test_memory_is_detached_layer_input():
    m = model(mem_length=24)
    tokens = torch.randint(0, 27, (2, 16))
    _, mem1 = m(tokens)
    _, mem2 = m(tokens, mem1)
    assert [t.shape for t in mem1] == [(2, 16, 32)] * 2 and [t.shape for t in mem2] == [(2, 24, 32)] * 2
    assert all(not t.requires_grad for t in mem2)
    torch.testing.assert_close(mem2[0][:, -16:], m.embed(tokens))
    torch.testing.assert_close(mem2[0][:, :8], mem1[0][:, 8:])


# ---- landmarks --------------------------------------------------------------------------------

def test_landmarks_are_project_then_compress():
    torch.manual_seed(5)
    B, L, D, H, c, r = 2, 16, 12, 3, 4, 2
    dh = D // H
    x = torch.randn(B, L, D, dtype=torch.float64)
    wp, bp = torch.randn(H * r, D, dtype=torch.float64), torch.randn(H * r, dtype=torch.float64)
    wkv, bkv = torch.randn(2 * D, D, dtype=torch.float64), torch.randn(2 * D, dtype=torch.float64)
    k, v = compress_landmarks(x, wp, bp, wkv, bkv, heads=H, chunk=c, rank=r)
    K, V = F.linear(x, wkv, bkv).chunk(2, dim=-1)
    for j in range(L // c):
        probs = torch.softmax(F.linear(x[:, j * c:(j + 1) * c], wp, bp), dim=1)  # (B, c, H*r)
        for h in range(H):
            for i in range(r):
                p = probs[:, :, h * r + i]
                want_k = (p[..., None] * K[:, j * c:(j + 1) * c, h * dh:(h + 1) * dh]).sum(1)
                want_v = (p[..., None] * V[:, j * c:(j + 1) * c, h * dh:(h + 1) * dh]).sum(1)
                torch.testing.assert_close(k[:, j * r + i, h * dh:(h + 1) * dh], want_k)
                torch.testing.assert_close(v[:, j * r + i, h * dh:(h + 1) * dh], want_v)


# ---- implementations and losses -----------------------------------------------------------------

def test_layer_blocked_equals_reference_with_gradients():
    torch.manual_seed(6)
    layer = TransformerLSLayer(tiny(chunk_rank=3, max_landmark_distance=4)).double()
    x = torch.randn(2, 40, 32, dtype=torch.float64, requires_grad=True)
    mem = torch.randn(2, 24, 32, dtype=torch.float64)
    outs, grads = [], []
    for impl in ("reference", "blocked"):
        layer.config.attention_impl = impl
        out = layer(x, mem)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), [x, *layer.parameters()]))
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_labels_give_per_token_losses():
    m = model()
    tokens = torch.randint(0, 27, (2, 16))
    labels = torch.randint(0, 27, (2, 16))
    logits, _ = m(tokens)
    losses, _ = m(tokens, labels=labels)
    assert losses.shape == (2, 16)
    want = F.cross_entropy(logits.reshape(-1, 27), labels.reshape(-1), reduction="none").view(2, 16)
    torch.testing.assert_close(losses, want)


def test_dropout_trains_and_eval_is_deterministic():
    m = TransformerLSLM(tiny(dropout=0.3, attention_dropout=0.1))
    tokens = torch.randint(0, 27, (2, 16))
    m.train()
    loss, _ = m(tokens, labels=tokens)
    loss.mean().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.eval()
    assert torch.equal(m(tokens)[0], m(tokens)[0])


def test_sinusoid_table_is_computed_once_and_exact():
    """Every layer and call projects the same sinusoid table: computed once (grown on demand), row p exactly
    sinusoid(p)."""
    from megatron_ls.model.positions import sinusoid, sinusoid_table

    small = sinusoid_table(5, 32, torch.device("cpu"), torch.float64)
    big = sinusoid_table(300, 32, torch.device("cpu"), torch.float64)
    assert torch.equal(big, sinusoid(torch.arange(300), 32, dtype=torch.float64)) and torch.equal(small, big[:5])
    again = sinusoid_table(40, 32, torch.device("cpu"), torch.float64)
    assert again.data_ptr() == big.data_ptr()  # a view of the cached table, nothing recomputed
