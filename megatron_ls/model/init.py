"""What every layer's constructor shares: how many heads this rank holds, and the initialisations."""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.parallel import mpu
from megatron_ls.parallel.layers import normal_init, shard_init


def local_heads(config: TransformerLSConfig) -> int:
    tp = mpu.get_tensor_model_parallel_world_size()
    if config.num_attention_heads % tp != 0:
        raise ValueError(f"num_attention_heads ({config.num_attention_heads}) must be divisible by the "
                         f"tensor-model-parallel size ({tp})")
    return config.num_attention_heads // tp


def output_init(config: TransformerLSConfig):
    # Megatron's scaled init for the projections that write into the residual stream.
    return normal_init(config.init_method_std / math.sqrt(2.0 * config.num_layers))


def head_parameter(full_shape: tuple[int, ...], init) -> nn.Parameter:
    """A per-head parameter split by head (dim 0), marked the way the TP layers mark theirs."""
    param = nn.Parameter(shard_init(full_shape, init, 0))
    param.tensor_model_parallel = mpu.get_tensor_model_parallel_world_size() > 1
    param.partition_dim = 0
    return param


def unpadded_init(init, rows: int):
    """Initialise only the real vocabulary rows (padding rows zero): the RNG stream, hence every later
    weight, is then the same whatever padding the tensor-parallel size adds."""

    def apply(full: torch.Tensor) -> None:
        init(full[:rows])
        full[rows:].zero_()

    return apply
