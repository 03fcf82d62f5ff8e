"""IncrementalDecoder: next-token logits of a TransformerLSLM one position at a time, with per-layer caches.

The logits equal those of the model's full forward over the stream as consecutive segments with
memory (megatron_ls.inference.context), at O(w + visible landmarks) work per token and layer.
`prefill` runs a prompt through the model's own layers segment by segment (the full forward) and
fills the caches from each layer's inputs; `step` then adds one token at a time.
"""

from __future__ import annotations

import math

import torch

from megatron_ls.inference.context import ContextRule
from megatron_ls.inference.layer_cache import LongShortLayerCache
from megatron_ls.model.lm import TransformerLSLM
from megatron_ls.model.long_short_attention import LongShortSelfAttention
from megatron_ls.model.memory import update_memory


def default_rule(model: TransformerLSLM) -> ContextRule:
    """The training semantics: segments of seq_length with mem_length of memory (one segment if unset)."""
    cfg = model.config
    return ContextRule(cfg.seq_length, cfg.mem_length)


class IncrementalDecoder:
    def __init__(self, model: TransformerLSLM, rule: ContextRule | None = None) -> None:
        cfg = model.config
        if cfg.attention_type not in ("long-short", "window"):
            raise ValueError(f"incremental decoding supports attention_type long-short and window, "
                             f"not {cfg.attention_type!r}")
        if model.padded_vocab_size != cfg.vocab_size:
            raise ValueError("incremental decoding needs the TP=1 model (load the consolidated checkpoint)")
        self.model = model.eval()
        self.rule = rule or default_rule(model)
        self.rule.check(cfg.chunk_size)
        self.caches = [LongShortLayerCache(layer.attention) for layer in model.layers]
        assert all(isinstance(layer.attention, LongShortSelfAttention) for layer in model.layers)
        self.position = 0  # the position of the next token

    @property
    def attended_keys(self) -> list[int]:
        """Per layer: window keys + landmarks the last query attended to (the per-token work)."""
        return [c.last_keys for c in self.caches]

    def _evict(self) -> None:
        first = self.rule.first_visible(self.position)
        for cache in self.caches:
            cache.evict(first)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) at position `self.position` -> logits (B, vocab) for the next position."""
        model, t = self.model, self.position
        first = self.rule.first_visible(t)
        h = model.embed(tokens.view(-1, 1))
        for layer, cache in zip(model.layers, self.caches):
            x = layer.ln_attn(h)
            cache.extend(x)
            h = h + cache.attend(x, t, first)
            h = h + layer.mlp(layer.ln_mlp(h))
        self.position += 1
        self._evict()
        return model.logits_local(model.final_norm(h))[:, 0, : model.config.vocab_size]

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed a prompt (B, T) from the current position; returns the logits (B, vocab) after its last token.

        The whole chunks run through the model's layers on the segment grid (exactly the full forward),
        the rest token by token.
        """
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"prompt tokens must be (B, T) with T >= 1, got {tuple(tokens.shape)}")
        model, cfg, c = self.model, self.model.config, self.model.config.chunk_size
        T = tokens.shape[1]
        bulk = (T // c) * c if self.position == 0 else 0  # the layers' memory is only rebuilt from a stream start
        logits = None
        done = 0
        memory: list[torch.Tensor | None] = [None] * cfg.num_layers
        while done < bulk:
            seg_end = self.rule.segment_length and (done // self.rule.segment_length + 1) * self.rule.segment_length
            end = min(bulk, seg_end) if seg_end else bulk
            h = model.embed(tokens[:, done:end])
            for i, (layer, cache) in enumerate(zip(model.layers, self.caches)):
                cache.extend(layer.ln_attn(h))
                new_mem = update_memory(memory[i], h, self.rule.mem_length)
                h = layer(h, memory[i])
                memory[i] = new_mem
            done = self.position = end
            self._evict()
            if end == T:
                logits = model.logits_local(model.final_norm(h[:, -1:]))[:, 0, : cfg.vocab_size]
        for i in range(done, T):
            logits = self.step(tokens[:, i])
        return logits


def perplexity_bits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log2 p(target) per position; logits (..., V), targets (...)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) / math.log(2)
