"""Tensor / pipeline / data parallelism: groups, TP layers, mappings, RNG, checkpointing."""

from megatron_ls.parallel import mpu
from megatron_ls.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_ls.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelLayerNorm,
    VocabParallelEmbedding,
    shard_init,
)
from megatron_ls.parallel.random import get_rng_tracker, model_parallel_seed, tensor_parallel_rng

__all__ = [
    "mpu",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "TensorParallelLayerNorm",
    "VocabParallelEmbedding",
    "shard_init",
    "vocab_parallel_cross_entropy",
    "get_rng_tracker",
    "model_parallel_seed",
    "tensor_parallel_rng",
]
