"""The recall scorer and the evaluation protocol's reach: which logits row answers a query, and which bytes can
change it."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_ls.data.recall_corpus import RecallSpec, find_queries, generate


def test_scorer_reads_each_query_from_the_right_logits_row():
    """predict_queries over a stream in steps of 16 with memory = one forward over the whole stream (the memory
    covers it all), and by_distance counts each query in exactly one bucket."""
    import torch

    from megatron_ls.inference.recall import by_distance, predict_queries
    from megatron_ls.model import TransformerLSConfig
    from megatron_ls.model.lm import TransformerLSLM

    spec = RecallSpec(min_distance=4, max_distance=64, mean_gap=2)
    tokens = np.frombuffer(generate(256, spec, seed=5), dtype=np.uint8).astype(np.int64)
    queries = find_queries(tokens, spec.key_length)
    assert len(queries) > 5
    torch.manual_seed(0)
    cfg = TransformerLSConfig(vocab_size=256, num_layers=1, hidden_size=32, num_attention_heads=2,
                              ffn_hidden_size=64, window_size=16, chunk_size=8, mem_length=256, dropout=0.0,
                              attention_impl="reference")
    model = TransformerLSLM(cfg).eval()
    predicted, probability = predict_queries(model, tokens, queries, context=256 + 16, step=16)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(tokens[:-1].copy())[None, :248])  # 255 inputs cut to whole chunks
    for q, p, prob in zip(queries, predicted, probability):
        if q.position - 1 < 248:
            row = logits[0, q.position - 1].double()
            assert p == int(row.argmax())
            assert prob == pytest.approx(float(torch.softmax(row, -1)[q.value]), rel=1e-4)
    buckets = by_distance(queries, predicted, probability, [4, 16, 1000])
    assert sum(b.queries for b in buckets) == len(queries)
    assert sum(b.correct for b in buckets) == int((predicted == [q.value for q in queries]).sum())


def test_every_byte_within_the_memory_reaches_the_prediction_and_none_beyond():
    """The long-range path has no blind spot in the evaluation protocol: at a row of a late segment, changing the
    input byte at any distance the memory covers (window, then landmarks of memory and segment chunks) changes
    the logits, and one beyond the memory's reach changes nothing (1 layer, so nothing travels further)."""
    import torch

    from megatron_ls.inference.evaluate import stream_logits
    from megatron_ls.model import TransformerLSConfig
    from megatron_ls.model.lm import TransformerLSLM

    N, M, w = 32, 64, 16
    torch.manual_seed(0)
    cfg = TransformerLSConfig(vocab_size=256, num_layers=1, hidden_size=32, num_attention_heads=2,
                              ffn_hidden_size=64, window_size=w, chunk_size=8, mem_length=M, dropout=0.0)
    model = TransformerLSLM(cfg).eval().double()
    tokens = np.random.default_rng(0).integers(0, 256, 300).astype(np.int64)
    row = 250  # input position whose logits predict token row + 1; its segment starts at 224
    reach = row - (row // N * N - M)  # the memory starts M tokens before the segment

    def logits(t: np.ndarray) -> torch.Tensor:
        return next(lg[row - start] for start, lg, _ in stream_logits(model, t, M + N, N) if row - start < N)

    base = logits(tokens)
    for d in (0, w - 1, w, w + 7, 40, reach - 1, reach, reach + 1, reach + 20):
        changed = tokens.copy()
        changed[row - d] = (changed[row - d] + 1) % 256
        delta = float((logits(changed) - base).abs().max())
        assert (delta > 1e-9) == (d <= reach), (d, reach, delta)
