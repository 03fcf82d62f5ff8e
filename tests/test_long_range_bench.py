"""bench/long_range.py end to end at a tiny size (the pipeline, not the accuracy), and the recall corpus itself."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from test_plot_runs import png_size
from training_utils import ROOT, env

from megatron_ls.data.recall_corpus import VALUE_ALPHABET, RecallSpec, find_queries, generate


def test_corpus_queries_are_read_back_with_their_distances():
    spec = RecallSpec(min_distance=16, max_distance=512, mean_gap=6)
    text = generate(60_000, spec, seed=3)
    assert len(text) == 60_000 and generate(60_000, spec, seed=3) == text
    tokens = np.frombuffer(text, dtype=np.uint8)
    queries = find_queries(tokens, spec.key_length)
    assert len(queries) > 500
    for q in queries:
        key = text[q.position - spec.key_length: q.position]
        assert text[q.position - spec.key_length - 1: q.position - spec.key_length] == b"?"
        record = text.rfind(b"#" + key, 0, q.position)  # the record the query asks: its first pair holds the value
        assert record >= 0 and text[record + 1 + spec.key_length] == q.value
        assert q.distance == q.position - (record + 1 + spec.key_length) >= spec.min_distance
        assert q.value in VALUE_ALPHABET
    # Log-uniform distances: each octave of [16, 512) holds a fair share (queries wait for filler: a little later).
    octaves = np.bincount([int(math.log2(q.distance)) - 4 for q in queries if q.distance < 512], minlength=5)
    assert (octaves[1:] > len(queries) / 10).all(), octaves
    # A split that starts inside a record loses that record's query only.
    assert len(find_queries(tokens[5:], spec.key_length)) >= len(queries) - 2


@pytest.mark.slow
def test_tiny_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "results" / "long_range.json"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "long_range.py"), "--work-dir", str(tmp_path / "work"),
         "--output", str(out), "--window", "16", "--chunk", "8", "--seq-length", "32", "--mem-length", "64",
         "--layers", "1", "--hidden", "32", "--heads", "2", "--batch", "2", "--steps", "4", "--warmup", "1",
         "--eval-interval", "2", "--test-bytes", "6000"],
        env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["models"]) == ["long-short", "window", "full"]
    assert result["chance"] == pytest.approx(1 / 26)
    for kind, model in result["models"].items():
        buckets = model["buckets"]
        assert [(b["low"], b["high"]) for b in buckets] == [(8, 16), (16, 32), (32, 64), (64, 128), (128, 256),
                                                             (256, 512)], kind
        assert sum(b["queries"] for b in buckets) > 50
        assert all(0 <= b["correct"] <= b["queries"] for b in buckets)
        assert model["wall_seconds"] > 0 and model["parameters"] > 0
        with open(os.path.join(model["run"], "metrics.jsonl")) as f:
            assert sum("lm_loss" in json.loads(line) for line in f) >= 1
    # Equal size: window and full get the FFN width that makes up for long-short's extra attention parameters,
    # to within half an FFN unit (2 x hidden + 1 parameters) per layer.
    params = {k: m["parameters"] for k, m in result["models"].items()}
    assert all(abs(p - params["long-short"]) <= (2 * 32 + 1) // 2 for p in params.values()), params
    assert png_size(str(out.with_suffix(".png"))) == (900, 560)
    assert "long-short" in r.stdout and "chance" in r.stdout


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


@pytest.mark.parametrize("flags", [["--types", "long-short,bogus"], ["--max-windows", "12"], ["--window", "30"]])
def test_bad_flags_are_one_line(tmp_path, flags):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "long_range.py"), "--work-dir", str(tmp_path),
                        *flags], env=env(), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("long_range.py: error:") and r.stderr.count("\n") == 1
    assert not os.listdir(tmp_path)
