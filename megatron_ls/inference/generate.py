"""Text generation with the incremental decoder: prompt -> prefill -> sample, one cached step per token."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megatron_ls.inference.context import ContextRule
from megatron_ls.inference.decoder import IncrementalDecoder
from megatron_ls.inference.sampling import sample_next
from megatron_ls.model.lm import TransformerLSLM


@dataclass
class Generation:
    tokens: list[int]  # the new tokens only
    prompt_seconds: float
    sample_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.sample_seconds if self.sample_seconds > 0 else float("inf")


def generate(model: TransformerLSLM, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             rule: ContextRule | None = None) -> Generation:
    if not prompt:
        raise ValueError("the prompt is empty: the model needs at least one token to condition on")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    decoder = IncrementalDecoder(model, rule)
    t0 = time.perf_counter()
    logits = decoder.prefill(torch.tensor([prompt], dtype=torch.long, device=device))
    t1 = time.perf_counter()
    out: list[int] = []
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        out.append(int(token[0]))
        if i + 1 < max_new_tokens:
            logits = decoder.step(token)
    return Generation(out, t1 - t0, time.perf_counter() - t1)
