"""Tensor-parallel layers (Megatron's ColumnParallelLinear, RowParallelLinear, ...).

Every parameter is initialised full-size from the current RNG on every rank and then sliced,
so a TP=2 model built with the same seed holds exactly the weights of the TP=1 model: the
test of every parallel layout is equality with one process. With TP=1 each layer is the
plain torch layer it replaces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ls.parallel import mpu, tensor_sequence
from megatron_ls.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    sum_partials_across_tensor_model_parallel_region,
)

InitMethod = Callable[[torch.Tensor], object]


def normal_init(std: float = 0.02) -> InitMethod:
    return lambda t: nn.init.normal_(t, mean=0.0, std=std)


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} {numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


def shard_init(full_shape: tuple[int, ...], init_method: InitMethod, partition_dim: int,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Initialise the full tensor and keep this rank's slice along `partition_dim`."""
    full = torch.empty(full_shape, dtype=dtype or torch.get_default_dtype())
    with torch.no_grad():
        init_method(full)
    world = mpu.get_tensor_model_parallel_world_size()
    if world == 1:
        return full
    divide(full_shape[partition_dim], world, f"dimension {partition_dim} of shape {tuple(full_shape)}")
    return full.chunk(world, dim=partition_dim)[mpu.get_tensor_model_parallel_rank()].contiguous()


def _mark(param: nn.Parameter, partition_dim: int) -> nn.Parameter:
    # Read by checkpoint conversion and by grad-norm code: which dim is split across TP.
    param.tensor_model_parallel = mpu.get_tensor_model_parallel_world_size() > 1
    param.partition_dim = partition_dim
    return param


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split by output rows; the output is this rank's partition."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = False,
                 init_method: InitMethod | None = None) -> None:
        super().__init__()
        world = mpu.get_tensor_model_parallel_world_size()
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, world, "output size")
        self.gather_output = gather_output
        init = init_method or normal_init()
        self.weight = _mark(nn.Parameter(shard_init((output_size, input_size), init, 0)), 0)
        self.bias = _mark(nn.Parameter(torch.zeros(self.output_size_per_partition)), 0) if bias else None

    def forward(self, x: torch.Tensor, skip_bias_add: bool = False) -> torch.Tensor:
        """skip_bias_add (Megatron's name): leave the bias out, for a consumer that fuses it (bias + GELU)."""
        bias = None if skip_bias_add else self.bias
        y = F.linear(copy_to_tensor_model_parallel_region(x), self.weight, bias)
        return gather_from_tensor_model_parallel_region(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split by input columns; partial products are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, input_is_parallel: bool = True,
                 init_method: InitMethod | None = None) -> None:
        super().__init__()
        if not input_is_parallel:
            raise NotImplementedError("RowParallelLinear expects its input already split (input_is_parallel)")
        world = mpu.get_tensor_model_parallel_world_size()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, world, "input size")
        init = init_method or normal_init()
        self.weight = _mark(nn.Parameter(shard_init((output_size, input_size), init, 1)), 1)
        self.bias = nn.Parameter(torch.zeros(output_size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tensor_sequence.enabled():  # leave the TP region with this rank's tokens of the sum
            y = tensor_sequence.reduce_scatter_along_sequence(F.linear(x, self.weight))
            return y + tensor_sequence.shared(self.bias) if self.bias is not None else y
        y = reduce_from_tensor_model_parallel_region(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


class SequenceParallelLayerNorm(nn.LayerNorm):
    """nn.LayerNorm that, under Megatron's sequence parallelism, sums its parameters' gradients over the TP group
    (each rank normalises only its own tokens). Otherwise exactly nn.LayerNorm (same parameters, same names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not tensor_sequence.enabled():
            return super().forward(x)
        return F.layer_norm(x, self.normalized_shape, tensor_sequence.shared(self.weight),
                            tensor_sequence.shared(self.bias), self.eps)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; tokens outside the local range read zeros."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_method: InitMethod | None = None) -> None:
        super().__init__()
        world = mpu.get_tensor_model_parallel_world_size()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per_rank = divide(num_embeddings, world, "vocabulary size")
        self.vocab_start = per_rank * mpu.get_tensor_model_parallel_rank()
        self.vocab_end = self.vocab_start + per_rank
        init = init_method or normal_init()
        self.weight = _mark(nn.Parameter(shard_init((num_embeddings, embedding_dim), init, 0)), 0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if mpu.get_tensor_model_parallel_world_size() == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(out)


class TensorParallelLayerNorm(nn.Module):
    """LayerNorm over the full width when the width is split across TP ranks.

    Weight and bias hold this rank's channels; mean and variance are all-reduced so the
    result equals nn.LayerNorm over the whole width (the paper's DualLN normalises over D).
    """

    def __init__(self, full_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        world = mpu.get_tensor_model_parallel_world_size()
        self.full_size, self.eps = full_size, eps
        local = divide(full_size, world, "layer-norm width")
        self.weight = _mark(nn.Parameter(torch.ones(local)), 0)
        self.bias = _mark(nn.Parameter(torch.zeros(local)), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if mpu.get_tensor_model_parallel_world_size() == 1:
            return F.layer_norm(x, (self.full_size,), self.weight, self.bias, self.eps)
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        mean = sum_partials_across_tensor_model_parallel_region(xf.sum(-1, keepdim=True)) / self.full_size
        centered = xf - mean
        var = sum_partials_across_tensor_model_parallel_region(
            centered.pow(2).sum(-1, keepdim=True)) / self.full_size
        y = centered * torch.rsqrt(var + self.eps)
        return (y * self.weight + self.bias).to(x.dtype)
