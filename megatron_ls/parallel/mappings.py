"""Autograd-aware communication between tensor-parallel ranks (Megatron's mappings).

Each mapping is the adjoint of its partner: copy (identity forward, all-reduce backward)
pairs with reduce (all-reduce forward, identity backward); scatter (split the last
dimension) pairs with gather (all-gather the last dimension). With TP=1 all are identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ls.parallel import mpu, tensor_sequence
from megatron_ls.parallel.adjoint import adjoint_pair


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if mpu.get_tensor_model_parallel_world_size() == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=mpu.get_tensor_model_parallel_group())
    return x


def _split_last_dim(x: torch.Tensor) -> torch.Tensor:
    world = mpu.get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    if x.shape[-1] % world != 0:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the tensor-parallel size {world}")
    return x.chunk(world, dim=-1)[mpu.get_tensor_model_parallel_rank()].contiguous()


def _gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    world = mpu.get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=mpu.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


_Copy = adjoint_pair("_Copy", lambda x: x, lambda grad: _all_reduce(grad.clone()))
_Reduce = adjoint_pair("_Reduce", lambda x: _all_reduce(x.clone()), lambda grad: grad)
_Scatter = adjoint_pair("_Scatter", _split_last_dim, _gather_last_dim)
_Gather = adjoint_pair("_Gather", _gather_last_dim, _split_last_dim)


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    # Under Megatron's sequence parallelism the region's input came through the all-gather along the sequence,
    # whose backward reduce-scatters: the gradient's sum over the TP group is done there (tensor_sequence.py).
    if mpu.get_tensor_model_parallel_world_size() == 1 or tensor_sequence.enabled():
        return x
    return _Copy.apply(x)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Reduce.apply(x) if mpu.get_tensor_model_parallel_world_size() > 1 else x


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Scatter.apply(x) if mpu.get_tensor_model_parallel_world_size() > 1 else x


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Gather.apply(x) if mpu.get_tensor_model_parallel_world_size() > 1 else x


# Sum of per-rank partial results that feed partitioned computation downstream: the backward all-reduces too,
# because each rank's partitioned consumers contribute only part of the gradient of the replicated sum.
_SumPartials = adjoint_pair("_SumPartials", lambda x: _all_reduce(x.clone()), lambda grad: _all_reduce(grad.clone()))


def sum_partials_across_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """All-reduce partial sums (e.g. LayerNorm statistics over a width split across ranks)."""
    return _SumPartials.apply(x) if mpu.get_tensor_model_parallel_world_size() > 1 else x
