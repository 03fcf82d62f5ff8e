"""Incremental decoding equals the model's full forward (segments with memory), at bounded work per token."""

from __future__ import annotations

import pytest
import torch

from megatron_ls.inference.context import ContextRule
from megatron_ls.inference.decoder import IncrementalDecoder
from megatron_ls.model import TransformerLSConfig, TransformerLSLM


def tiny_model(**overrides) -> TransformerLSLM:
    base = dict(vocab_size=256, num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                window_size=64, chunk_size=16, chunk_rank=1, mem_length=0, dropout=0.0, seq_length=None,
                attention_impl="blocked")
    torch.manual_seed(0)
    model = TransformerLSLM(TransformerLSConfig(**{**base, **overrides})).eval()
    # Non-trivial norms and biases so that every term of the scores matters.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def full_forward(model: TransformerLSLM, tokens: torch.Tensor, segment: int | None) -> torch.Tensor:
    """Logits of every position: consecutive segments with memory, exactly as training runs a stream."""
    if segment is None:
        return model(tokens)[0]
    out, memory = [], None
    with torch.no_grad():
        for s in range(0, tokens.shape[1], segment):
            logits, memory = model(tokens[:, s: s + segment], memory)
            out.append(logits)
    return torch.cat(out, dim=1)


def incremental(decoder: IncrementalDecoder, tokens: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    logits, work = [], []
    for i in range(tokens.shape[1]):
        logits.append(decoder.step(tokens[:, i]))
        work.append(max(decoder.attended_keys))
    return torch.stack(logits, dim=1), work


@pytest.mark.parametrize("segment,mem", [(None, 0), (512, 256)], ids=["one-segment", "segments-with-memory"])
def test_incremental_equals_full_forward_4k(segment, mem):
    model = tiny_model(mem_length=mem, seq_length=segment)
    tokens = torch.randint(0, 256, (1, 4096), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = full_forward(model, tokens, segment)
    got, work = incremental(IncrementalDecoder(model, ContextRule(segment, mem)), tokens)
    err = (got - ref).abs().max().item()
    assert err < 1e-5, err
    w, c = 64, 16
    if segment is None:
        # O(w + t/c): the keys attended grow by exactly one landmark per completed chunk.
        assert work[1023] == w + 1024 // c - 1 and work[4095] == w + 4096 // c - 1
    else:
        assert max(work) <= w + (segment + mem) // c


def test_prefill_matches_steps_and_continues():
    model = tiny_model(mem_length=64, seq_length=128)
    tokens = torch.randint(0, 256, (2, 320), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = full_forward(model, tokens, 128)
    dec = IncrementalDecoder(model)  # the model's own semantics: segments of 128 with 64 of memory
    last = dec.prefill(tokens[:, :250])  # 240 through the layers on the segment grid, 10 one by one
    assert (last - ref[:, 249]).abs().max().item() < 1e-5
    rest = torch.stack([dec.step(tokens[:, i]) for i in range(250, 320)], dim=1)
    assert (rest - ref[:, 250:]).abs().max().item() < 1e-5
    whole = IncrementalDecoder(model).prefill(tokens[:, :256])  # ends on a chunk: logits from the forward
    assert (whole - ref[:, 255]).abs().max().item() < 1e-5
