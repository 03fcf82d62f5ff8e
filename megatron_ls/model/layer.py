"""One Pre-LN Transformer-LS layer: x + attention(LN(x)), then + MLP(LN(.))."""

from __future__ import annotations

import torch
from torch import nn

from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.model.full_self_attention import FullSelfAttention
from megatron_ls.model.long_short_attention import LongShortSelfAttention
from megatron_ls.model.mlp import MLP


class TransformerLSLayer(nn.Module):
    def __init__(self, config: TransformerLSConfig) -> None:
        super().__init__()
        self.config = config
        self.ln_attn = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        attention = FullSelfAttention if config.attention_type == "full" else LongShortSelfAttention
        self.attention = attention(config)
        self.ln_mlp = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D) this layer's input; memory (B, M, D) its inputs for the previous M tokens."""
        mem = None if memory is None or memory.shape[1] == 0 else self.ln_attn(memory)
        x = x + self.attention(self.ln_attn(x), mem)
        return x + self.mlp(self.ln_mlp(x))
