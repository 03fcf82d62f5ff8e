"""Recall accuracy of a model on the key=value corpus (megatron_ls/data/recall_corpus.py), by distance.

The split is read as one stream by the evaluation protocol (``stream_logits``: at most `context` tokens behind
each prediction, carried by the memory); at each query's value byte the model's most likely next byte is
compared with the value, and the probability it gave the value is kept too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_ls.data.recall_corpus import Query
from megatron_ls.inference.evaluate import stream_logits
from megatron_ls.model.lm import TransformerLSLM


@dataclass
class Bucket:
    low: int  # distances low <= d < high
    high: int
    queries: int
    correct: int
    mean_probability: float  # mean probability the model gave the right value

    @property
    def accuracy(self) -> float:
        return self.correct / self.queries if self.queries else float("nan")

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "queries": self.queries, "correct": self.correct,
                "accuracy": self.accuracy, "mean_probability": self.mean_probability}


def predict_queries(model: TransformerLSLM, tokens: np.ndarray, queries: Sequence[Query], context: int,
                    step: int) -> tuple[np.ndarray, np.ndarray]:
    """(the byte the model finds most likely at each query's value position, the probability of the value)."""
    wanted: dict[int, int] = {q.position: i for i, q in enumerate(queries)}
    predicted = np.full(len(queries), -1, dtype=np.int64)
    probability = np.zeros(len(queries), dtype=np.float64)
    for start, logits, _ in stream_logits(model, tokens, context, step):
        rows = [(p - 1 - start, i) for p, i in wanted.items() if start < p <= start + len(logits)]
        if not rows:
            continue
        at = torch.tensor([r for r, _ in rows])
        picked = logits[at].double()
        values = torch.tensor([queries[i].value for _, i in rows])
        probs = torch.softmax(picked, dim=-1).gather(-1, values[:, None])[:, 0]
        for (_, i), best, p in zip(rows, picked.argmax(-1).tolist(), probs.tolist()):
            predicted[i], probability[i] = best, p
    return predicted, probability


def by_distance(queries: Sequence[Query], predicted: np.ndarray, probability: np.ndarray,
                edges: Sequence[int]) -> list[Bucket]:
    """Accuracy per distance bucket [edges[k], edges[k+1]); the last bucket includes its upper edge."""
    buckets = []
    distances = np.array([q.distance for q in queries])
    hits = predicted == np.array([q.value for q in queries])
    for k, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        last = k == len(edges) - 2
        inside = (distances >= low) & ((distances <= high) if last else (distances < high))
        n = int(inside.sum())
        buckets.append(Bucket(low, high, n, int(hits[inside].sum()),
                              float(probability[inside].mean()) if n else float("nan")))
    return buckets
