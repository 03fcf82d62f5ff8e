"""Process groups for tensor, pipeline and data parallelism (Megatron's `mpu`).

The groups are those of a ParallelLayout (parallel/layout.py: degrees, rank order, the rules).

The getters named `get_model_parallel_*` are the ones DeepSpeed calls on an `mpu` object;
in this project "model parallel" means tensor parallel, as in Megatron-DeepSpeed.
When nothing is initialised every getter answers for a single process (size 1, rank 0),
so the model runs unchanged in one process without torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megatron_ls.errors import ParallelConfigError

from .layout import ParallelLayout


@dataclass
class _State:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None
    pp_ranks: tuple = ()  # global ranks of this rank's pipeline, first stage first
    sp: int = 1
    sp_group: object = None
    sd_group: object = None  # DP x SP: the ranks with the same weights
    layout: ParallelLayout | None = None
    initialized: bool = False


_STATE = _State()


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              layout: ParallelLayout | None = None) -> None:
    """Build every group of ``layout`` (or of one with these degrees). Must be called on all ranks after
    torch.distributed is initialised."""
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed to be initialised first")
    world, rank = dist.get_world_size(), dist.get_rank()
    if layout is None:
        layout = ParallelLayout(world, tensor_model_parallel_size, pipeline_model_parallel_size)
    elif layout.world_size != world:
        raise ParallelConfigError(f"the layout is for {layout.world_size} ranks, torch.distributed has {world}")
    state = _State(tp=layout.tp, pp=layout.pp, dp=layout.dp, sp=layout.sp, layout=layout)
    # new_group must be called by every rank for every group, in the same order.
    for ranks in layout.tp_groups():
        group = dist.new_group(ranks)
        if rank in ranks:
            state.tp_group = group
    for ranks in layout.dp_groups():
        group = dist.new_group(ranks)
        if rank in ranks:
            state.dp_group = group
    for ranks in layout.pp_groups():
        group = dist.new_group(ranks)
        if rank in ranks:
            state.pp_group, state.pp_ranks = group, tuple(ranks)
    state.sd_group = state.dp_group
    if layout.sp > 1:
        for ranks in layout.sp_groups():
            group = dist.new_group(ranks)
            if rank in ranks:
                state.sp_group = group
        for ranks in layout.sequence_data_groups():
            group = dist.new_group(ranks)
            if rank in ranks:
                state.sd_group = group
    state.initialized = True
    global _STATE
    _STATE = state


def get_layout() -> ParallelLayout:
    """The layout the groups were built from (one process when nothing is initialised)."""
    return _STATE.layout if _STATE.layout is not None else ParallelLayout(1)


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


# Sequence parallel (DeepSpeed-Ulysses' names, which DeepSpeed's engine and ZeRO call) -----
def get_sequence_parallel_world_size() -> int:
    return _STATE.sp


def get_sequence_parallel_rank() -> int:
    return _rank_in(_STATE.sp_group, _STATE.sp)


def get_sequence_parallel_group() -> object:
    return _STATE.sp_group


def get_sequence_data_parallel_world_size() -> int:
    return _STATE.dp * _STATE.sp


def get_sequence_data_parallel_rank() -> int:
    return _rank_in(_STATE.sd_group, _STATE.dp * _STATE.sp)


def get_sequence_data_parallel_group() -> object:
    """DP x SP: gradients reduce and ZeRO shards over it."""
    return _STATE.sd_group


# The names DeepSpeed calls ("model parallel" = tensor parallel in Megatron-DeepSpeed) ----
get_model_parallel_world_size = get_tensor_model_parallel_world_size
get_model_parallel_rank = get_tensor_model_parallel_rank
get_model_parallel_group = get_tensor_model_parallel_group
