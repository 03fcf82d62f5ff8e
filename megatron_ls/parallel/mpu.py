"""Process groups for tensor, pipeline and data parallelism (Megatron's `mpu`).

Rank layout follows Megatron and DeepSpeed's PipeModelDataParallelTopology with axes
(pipe, data, model): the tensor-parallel rank varies fastest, so TP groups are contiguous
ranks (they share a node), then data-parallel, then pipeline stage:

    global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

The getters named `get_model_parallel_*` are the ones DeepSpeed calls on an `mpu` object;
in this project "model parallel" means tensor parallel, as in Megatron-DeepSpeed.
When nothing is initialised every getter answers for a single process (size 1, rank 0),
so the model runs unchanged in one process without torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work (raised identically on every rank)."""


@dataclass
class _State:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None
    pp_ranks: tuple = ()  # global ranks of this rank's pipeline, first stage first
    initialized: bool = False


_STATE = _State()


def check_parallel_sizes(world_size: int, tp: int, pp: int) -> int:
    """Validate a layout before any group is built; returns the data-parallel size."""
    if tp < 1 or pp < 1:
        raise ParallelConfigError(f"tensor-model-parallel-size ({tp}) and pipeline-model-parallel-size ({pp}) "
                                  "must be >= 1")
    if world_size % (tp * pp) != 0:
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by tensor-model-parallel-size ({tp}) x "
            f"pipeline-model-parallel-size ({pp}) = {tp * pp}")
    return world_size // (tp * pp)


def rank_coordinates(rank: int, tp: int, dp: int) -> tuple[int, int, int]:
    """(pp_rank, dp_rank, tp_rank) of a global rank."""
    return rank // (dp * tp), (rank // tp) % dp, rank % tp


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1) -> None:
    """Build every group. Must be called on all ranks after torch.distributed is initialised."""
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed to be initialised first")
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = check_parallel_sizes(world, tp, pp)
    state = _State(tp=tp, pp=pp, dp=dp)
    my_pp, my_dp, my_tp = rank_coordinates(rank, tp, dp)

    def rank_of(p: int, d: int, t: int) -> int:
        return p * dp * tp + d * tp + t

    # new_group must be called by every rank for every group, in the same order.
    for p in range(pp):
        for d in range(dp):
            ranks = [rank_of(p, d, t) for t in range(tp)]
            group = dist.new_group(ranks)
            if (p, d) == (my_pp, my_dp):
                state.tp_group = group
    for p in range(pp):
        for t in range(tp):
            ranks = [rank_of(p, d, t) for d in range(dp)]
            group = dist.new_group(ranks)
            if (p, t) == (my_pp, my_tp):
                state.dp_group = group
    for d in range(dp):
        for t in range(tp):
            ranks = [rank_of(p, d, t) for p in range(pp)]
            group = dist.new_group(ranks)
            if (d, t) == (my_dp, my_tp):
                state.pp_group, state.pp_ranks = group, tuple(ranks)
    state.initialized = True
    global _STATE
    _STATE = state


def destroy_model_parallel() -> None:
    global _STATE
    _STATE = _State()


def model_parallel_is_initialized() -> bool:
    return _STATE.initialized


def _rank_in(group: object, size: int) -> int:
    return dist.get_rank(group=group) if size > 1 else 0


# Tensor parallel -----------------------------------------------------------------------
def get_tensor_model_parallel_world_size() -> int:
    return _STATE.tp


def get_tensor_model_parallel_rank() -> int:
    return _rank_in(_STATE.tp_group, _STATE.tp)


def get_tensor_model_parallel_group() -> object:
    return _STATE.tp_group


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 in this rank's TP group."""
    return (dist.get_rank() // _STATE.tp) * _STATE.tp if _STATE.initialized else 0


# Pipeline parallel ---------------------------------------------------------------------
def get_pipeline_model_parallel_world_size() -> int:
    return _STATE.pp


def get_pipeline_model_parallel_rank() -> int:
    return _rank_in(_STATE.pp_group, _STATE.pp)


def get_pipeline_model_parallel_group() -> object:
    return _STATE.pp_group


def get_pipeline_model_parallel_last_rank() -> int:
    """Global rank of the last stage of this rank's pipeline (Megatron's name)."""
    return _STATE.pp_ranks[-1] if _STATE.initialized else 0


# Data parallel -------------------------------------------------------------------------
def get_data_parallel_world_size() -> int:
    return _STATE.dp


def get_data_parallel_rank() -> int:
    return _rank_in(_STATE.dp_group, _STATE.dp)


def get_data_parallel_group() -> object:
    return _STATE.dp_group


# The names DeepSpeed calls ("model parallel" = tensor parallel in Megatron-DeepSpeed) ----
get_model_parallel_world_size = get_tensor_model_parallel_world_size
get_model_parallel_rank = get_tensor_model_parallel_rank
get_model_parallel_group = get_tensor_model_parallel_group
