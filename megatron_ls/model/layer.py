"""One Pre-LN Transformer-LS layer: x + attention(LN(x)), then + MLP(LN(.))."""

from __future__ import annotations

import torch
from torch import nn

from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.model.full_self_attention import FullSelfAttention
from megatron_ls.model.long_short_attention import LongShortSelfAttention
from megatron_ls.model.mlp import MLP
from megatron_ls.parallel.layers import SequenceParallelLayerNorm
from megatron_ls.parallel.tensor_sequence import gather_along_sequence


class TransformerLSLayer(nn.Module):
    def __init__(self, config: TransformerLSConfig) -> None:
        super().__init__()
        self.config = config
        self.ln_attn = SequenceParallelLayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        attention = FullSelfAttention if config.attention_type == "full" else LongShortSelfAttention
        self.attention = attention(config)
        self.ln_mlp = SequenceParallelLayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D) this layer's input; memory (B, M, D) its inputs for the previous M tokens."""
        mem = None if memory is None or memory.shape[1] == 0 else self.ln_attn(memory)
        # Under Megatron's sequence parallelism x is this TP rank's slice of the tokens (the memory is all of them):
        # each TP region starts from all of them (parallel/tensor_sequence.py); otherwise the gathers do nothing.
        x = x + self.attention(gather_along_sequence(self.ln_attn(x)), mem)
        return x + self.mlp(gather_along_sequence(self.ln_mlp(x)))
