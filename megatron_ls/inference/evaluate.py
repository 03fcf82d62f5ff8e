"""Bits per character by the paper's protocol: one stream, long context carried by the memory.

The split is read as one stream. The model predicts `step` new tokens at a time (one segment) with
the layer inputs of the previous `context - step` tokens as memory, so no prediction conditions on
more than `context` tokens (its own input included) and the first of a step on context - step.
Targets are tokens 1 .. T-1 of the split (token 0 has nothing to condition on): each is predicted
exactly once, none skipped; the last segment is padded to a whole chunk and the padding's
predictions dropped (the model is causal, so padding changes nothing before it).
BPC = sum of -log2 p(target) / number of targets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from megatron_ls.model.lm import TransformerLSLM, pad_to_chunks


@dataclass
class EvalResult:
    bpc: float
    nats_per_token: float
    tokens: int
    context: int
    step: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_protocol(context: int, step: int, chunk: int) -> int:
    """The memory length of the protocol; ValueError when context / step do not fit the chunking."""
    if step < 1 or step % chunk:
        raise ValueError(f"--step ({step}) must be a positive multiple of the chunk size ({chunk})")
    if context < step or (context - step) % chunk:
        raise ValueError(f"--context ({context}) must be >= --step ({step}) and differ from it by a multiple of the "
                         f"chunk size ({chunk})")
    return context - step


@torch.no_grad()
def stream_logits(model: TransformerLSLM, tokens: np.ndarray, context: int,
                  step: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(start, logits, targets) for each step of the protocol: logits (n, vocab) predict targets = tokens
    start+1 .. start+n, each from at most `context` tokens. The model's config.mem_length must be context - step."""
    cfg = model.config
    mem = check_protocol(context, step, cfg.chunk_size)
    if cfg.mem_length != mem:
        raise ValueError(f"the model's mem_length is {cfg.mem_length}, the protocol needs context - step = {mem}")
    total = len(tokens) - 1
    if total < 1:
        raise ValueError("the split holds fewer than 2 tokens: nothing to predict")
    device = next(model.parameters()).device
    memory = None
    for start in range(0, total, step):
        n = min(step, total - start)
        window = torch.from_numpy(np.asarray(tokens[start: start + n + 1], dtype=np.int64)).to(device)
        inputs, targets = pad_to_chunks(window[:-1], cfg.chunk_size), window[1:]
        logits, memory = model(inputs[None], memory)
        yield start, logits[0, :n], targets


@torch.no_grad()
def evaluate_stream(model: TransformerLSLM, tokens: np.ndarray, context: int, step: int,
                    progress: Callable[[int], None] | None = None) -> EvalResult:
    """BPC of `tokens` (1-D) with a model whose config.mem_length is context - step."""
    nats = None
    total = 0
    t0 = time.perf_counter()
    for _, logits, targets in stream_logits(model, tokens, context, step):
        logp = torch.log_softmax(logits.double(), dim=-1)
        step_nats = -logp.gather(-1, targets[:, None]).sum()
        nats = step_nats if nats is None else nats + step_nats
        total += len(targets)
        if progress is not None:
            progress(len(targets))
    seconds = time.perf_counter() - t0
    nats_per_token = float(nats) / total
    return EvalResult(nats_per_token / math.log(2), nats_per_token, total, context, step, seconds)
