"""Full causal self-attention over [memory ; segment]: the paper's `full` baseline.

Rotary positions instead of Transformer-XL's (so SDPA / flash kernels apply on GPU); heads are
split across TP ranks like the long-short layer's.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_ls.model.attention import full_attention
from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.model.init import local_heads, output_init
from megatron_ls.model.positions import rotary
from megatron_ls.parallel.layers import ColumnParallelLinear, RowParallelLinear, normal_init
from megatron_ls.parallel.random import tensor_parallel_rng
from megatron_ls.parallel.tensor_sequence import residual_dropout


class FullSelfAttention(nn.Module):
    def __init__(self, config: TransformerLSConfig) -> None:
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.heads = local_heads(config)
        self.head_dim = D // config.num_attention_heads
        init = normal_init(config.init_method_std)
        self.query = ColumnParallelLinear(D, D, init_method=init)
        self.key = ColumnParallelLinear(D, D, init_method=init)
        self.value = ColumnParallelLinear(D, D, init_method=init)
        self.dense = RowParallelLinear(D, D, init_method=output_init(config))
        self.dropout = nn.Dropout(config.dropout)
        self.core = full_attention  # (q, k, v, dropout_p=) -> out; bench/attention.py swaps in other cores

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, impl: str | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        M = 0 if memory is None else memory.shape[1]
        stream = x if M == 0 else torch.cat([memory, x], dim=1)
        positions = torch.arange(M + N, device=x.device)
        q = rotary(self._heads(self.query(x)), positions[M:])
        k = rotary(self._heads(self.key(stream)), positions)
        v = self._heads(self.value(stream))
        p = self.config.attention_dropout if self.training else 0.0
        with tensor_parallel_rng():
            out = self.core(q, k, v, dropout_p=p)
        out = out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)
        return residual_dropout(self.dropout, self.dense(out))
