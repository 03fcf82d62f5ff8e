"""The recall corpus: key=value records queried d bytes later, read back with their distances."""

from __future__ import annotations

import math

import numpy as np

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
        record = text.rfind(b"#" + key, 0, q.position)  # the record the query asks, its pair written `repeats` times
        pair = key + bytes([q.value])
        assert record >= 0 and text[record + 1: record + 1 + spec.repeats * len(pair)] == pair * spec.repeats
        last_copy = record + spec.repeats * len(pair)  # distances count from the nearest copy of the value
        assert text[last_copy] == q.value and text[last_copy + 1: last_copy + 2] == b" "
        assert q.distance == q.position - last_copy >= spec.min_distance
        assert q.value in VALUE_ALPHABET
    # Log-uniform distances: each octave of [16, 512) holds a fair share (queries wait for filler: a little later).
    octaves = np.bincount([int(math.log2(q.distance)) - 4 for q in queries if q.distance < 512], minlength=5)
    assert (octaves[1:] > len(queries) / 10).all(), octaves
    # A split that starts inside a record loses that record's query only.
    assert len(find_queries(tokens[5:], spec.key_length)) >= len(queries) - 2
