"""The GELU feed-forward block: fc1 column-parallel, fc2 row-parallel (one all-reduce).

On CUDA with Triton, fc1's bias and the GELU run as one fused kernel (megatron_ls/kernels/bias_gelu.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ls.kernels.availability import triton_importable
from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.model.init import output_init
from megatron_ls.parallel.layers import ColumnParallelLinear, RowParallelLinear, normal_init
from megatron_ls.parallel.random import tensor_parallel_rng
from megatron_ls.parallel.tensor_sequence import residual_dropout


class MLP(nn.Module):
    def __init__(self, config: TransformerLSConfig) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.ffn_hidden_size,
                                        init_method=normal_init(config.init_method_std))
        self.fc2 = RowParallelLinear(config.ffn_hidden_size, config.hidden_size, init_method=output_init(config))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.fc1.bias is not None and not self.fc1.gather_output and triton_importable():
            from megatron_ls.kernels.bias_gelu import bias_gelu

            h = bias_gelu(self.fc1(x, skip_bias_add=True), self.fc1.bias)  # one pass instead of add + GELU
        else:
            h = F.gelu(self.fc1(x))
        # As in the official model, dropout after the activation too; it is sharded across TP ranks.
        with tensor_parallel_rng():
            h = self.dropout(h)
        return residual_dropout(self.dropout, self.fc2(h))
