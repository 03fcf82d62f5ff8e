"""Sequence parallelism, DeepSpeed-Ulysses style: one segment's tokens split over the ranks of an SP group.

Everything outside the attention core runs on this rank's contiguous slice of the sequence (rank k holds
positions [k N/K, (k+1) N/K) of the segment and the same slice of the memory). Around the core, DeepSpeed's own
all-to-all (``deepspeed.sequence.layer._SeqAllToAll``, what ``DistributedAttention`` runs) trades the sequence
shard of every head for the whole sequence of 1/K of the heads, and back: the core then runs unchanged.
"""

from __future__ import annotations

import torch

from megatron_ls.parallel import mpu


def sp_size() -> int:
    return mpu.get_sequence_parallel_world_size()


def sp_rank() -> int:
    return mpu.get_sequence_parallel_rank()


def _all_to_all(t: torch.Tensor, scatter: int, gather: int) -> torch.Tensor:
    from deepspeed.sequence.layer import _SeqAllToAll

    return _SeqAllToAll.apply(mpu.get_sequence_parallel_group(), t.contiguous(), scatter, gather, 0)


def sequence_to_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, S/K, H, d) this rank's tokens of every head -> (B, S, H/K, d) every token of this rank's heads."""
    return t if sp_size() == 1 else _all_to_all(t, 2, 1)


def heads_to_sequence(t: torch.Tensor) -> torch.Tensor:
    """(B, S, H/K, d) -> (B, S/K, H, d): the inverse of sequence_to_heads."""
    return t if sp_size() == 1 else _all_to_all(t, 1, 2)


def local_heads_slice(heads: int) -> slice:
    """Which of this TP rank's ``heads`` this SP rank holds after ``sequence_to_heads``."""
    per = heads // sp_size()
    return slice(sp_rank() * per, (sp_rank() + 1) * per)


def local_tokens(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This SP rank's contiguous slice of a full-length tensor along ``dim`` (the data's split of a segment)."""
    k = sp_size()
    if k == 1:
        return t
    n = t.shape[dim] // k
    return t.narrow(dim, sp_rank() * n, n)
