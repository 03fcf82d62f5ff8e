"""Megatron's sequence parallelism inside the tensor-parallel group (``--sequence-parallel``).

Outside the TP regions (the LayerNorms, the dropouts, the residual stream) each TP rank holds only its slice of
the tokens, (B, N/tp, D), instead of a replicated copy of all of them. A TP region (attention, MLP) starts with an
all-gather along the sequence (its backward reduce-scatters: the gradient's sum over the TP ranks happens there,
so ``copy_to_tensor_model_parallel_region`` is the identity meanwhile) and ends with a reduce-scatter along the
sequence instead of the row-parallel all-reduce. Parameters applied to a slice of the tokens (the LayerNorms of
the residual stream, the row-parallel biases) have their gradient summed over the TP group (``shared``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ls.parallel import mpu
from megatron_ls.parallel.adjoint import adjoint_pair


def enabled() -> bool:
    return mpu.get_layout().sequence_parallel and mpu.get_tensor_model_parallel_world_size() > 1


def _tp() -> tuple[int, object]:
    return mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_group()


def _gather(x: torch.Tensor) -> torch.Tensor:
    """(B, n, ...) on each TP rank -> (B, tp n, ...) in rank order."""
    world, group = _tp()
    first = x.transpose(0, 1).contiguous()
    out = first.new_empty((world * first.shape[0], *first.shape[1:]))
    dist.all_gather_into_tensor(out, first, group=group)
    return out.transpose(0, 1).contiguous()


def _reduce_scatter(x: torch.Tensor) -> torch.Tensor:
    """(B, N, ...) partial sums on each TP rank -> this rank's (B, N/tp, ...) slice of their sum."""
    world, group = _tp()
    first = x.transpose(0, 1).contiguous()
    if first.shape[0] % world:
        raise ValueError(f"sequence length {first.shape[0]} is not divisible by the tensor-parallel size {world}")
    out = first.new_empty((first.shape[0] // world, *first.shape[1:]))
    dist.reduce_scatter_tensor(out, first, group=group)
    return out.transpose(0, 1).contiguous()


def _split(x: torch.Tensor) -> torch.Tensor:
    world = mpu.get_tensor_model_parallel_world_size()
    n = x.shape[1] // world
    return x[:, mpu.get_tensor_model_parallel_rank() * n:(mpu.get_tensor_model_parallel_rank() + 1) * n].contiguous()


_GatherAlongSequence = adjoint_pair("_GatherAlongSequence", _gather, _reduce_scatter)
_ReduceScatterAlongSequence = adjoint_pair("_ReduceScatterAlongSequence", _reduce_scatter, _gather)
_SplitAlongSequence = adjoint_pair("_SplitAlongSequence", _split, _gather)


def _all_reduce_tp(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.contiguous().clone()
    dist.all_reduce(grad, group=mpu.get_tensor_model_parallel_group())
    return grad


_Shared = adjoint_pair("_Shared", lambda p: p, _all_reduce_tp)


def gather_along_sequence(x: torch.Tensor) -> torch.Tensor:
    """Enter a TP region: all the tokens (forward all-gather, backward reduce-scatter)."""
    return _GatherAlongSequence.apply(x) if enabled() else x


def gather_without_grad(x: torch.Tensor) -> torch.Tensor:
    """All the tokens of a tensor that needs no gradient (the memory's inputs)."""
    if not enabled():
        return x
    with torch.no_grad():
        return _gather(x.detach())


def reduce_scatter_along_sequence(x: torch.Tensor) -> torch.Tensor:
    """Leave a TP region: this rank's tokens of the sum of the partial outputs."""
    return _ReduceScatterAlongSequence.apply(x) if enabled() else x


def split_along_sequence(x: torch.Tensor) -> torch.Tensor:
    """This rank's tokens of a replicated tensor (the embedding's output)."""
    return _SplitAlongSequence.apply(x) if enabled() else x


def shared(p: torch.Tensor) -> torch.Tensor:
    """A parameter applied to this rank's tokens only: its gradient is summed over the TP group."""
    return _Shared.apply(p) if enabled() else p


def residual_dropout(dropout: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dropout on the residual stream. Under sequence parallelism each TP rank holds other tokens, so the masks come
    from the TP rank's own stream (the tracker), as Megatron draws them; otherwise the shared default stream."""
    if not enabled():
        return dropout(x)
    from megatron_ls.parallel.random import tensor_parallel_rng

    with tensor_parallel_rng():
        return dropout(x)
