"""Resume a run with another --sequence-parallel-size: the run state of the old SP ranks, resharded.

Sequence parallelism shards no weight, and without ZeRO DeepSpeed keeps the optimizer state whole in the
model files, so DeepSpeed's files load as they are. What this module reshards is the run's own per-rank state:
- the memory cache: each SP rank holds a contiguous slice of the memory's M positions, (lanes, M / K, D); the
  new rank's slice is cut from the old slices laid end to end;
- the lane position: the same on every SP rank of a lane (they read the same tokens);
- the RNG states: those of the old SP rank whose slice holds the new rank's first position, so a run without
  dropout continues exactly; dropout masks are drawn per shard and cannot match any one degree.

Under ZeRO 1-3, whose partitions of the optimizer state (and with ZeRO-3 of the weights) follow the DP x SP
group, DeepSpeed's own files go through its universal checkpoint (zero_reshard.py). Refused (one line each, see
check_sp_reshard): bf16 with pipeline parallelism (DeepSpeed's BF16_Optimizer partitions the same way, and its
files are not ones DeepSpeed 0.19.8's universal converter reads); Megatron's --sequence-parallel on either side
(the memory is then also split over TP); and any other layout change.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_ls.errors import CheckpointError
from megatron_ls.parallel.layout import ParallelLayout


def check_sp_reshard(saved: dict[str, Any], run: dict[str, Any], path: str) -> None:
    """Raise CheckpointError if a resume from layout ``saved`` cannot be resharded to ``run``'s SP degree."""
    old, new = saved.get("sequence_parallel_size", 1), run.get("sequence_parallel_size", 1)
    why = ""
    if saved.get("sequence_parallel") or run.get("sequence_parallel"):
        why = "with --sequence-parallel the memory is split over TP as well"
    elif run.get("bf16") and run.get("pipeline_model_parallel_size", 1) > 1:
        why = ("DeepSpeed's bf16 pipeline optimizer partitions its state over DP x SP, and DeepSpeed 0.19.8 can "
               "neither repartition it nor convert it to its universal format")
    if why:
        raise CheckpointError(f"checkpoint {path} was saved with --sequence-parallel-size {old}, this run has {new}: "
                              f"{why}; resume with --sequence-parallel-size {old}, or start a new phase from its "
                              "weights with --finetune")


def saved_layout(layout: dict[str, Any], world_size: int, zero_stage: int) -> ParallelLayout:
    """The layout recorded in run_state.json as an object (its ranks' coordinates)."""
    return ParallelLayout(world_size, layout.get("tensor_model_parallel_size", 1),
                          layout.get("pipeline_model_parallel_size", 1), zero_stage,
                          layout.get("sequence_parallel_size", 1), bool(layout.get("sequence_parallel")))


def old_ranks(saved: ParallelLayout, now: ParallelLayout, rank: int) -> list[int]:
    """The old ranks holding the slices of this rank's lanes, in sequence order."""
    c = now.coordinates(rank)
    return [saved.rank_of(c.pp_rank, c.dp_rank, c.tp_rank, s) for s in range(saved.sp)]


def _reslice(slices: list[torch.Tensor], part: int, parts: int) -> torch.Tensor:
    whole = torch.cat(slices, dim=1)
    if whole.shape[1] % parts:
        raise ValueError(f"a memory of {whole.shape[1]} positions cannot be split over {parts} SP ranks")
    n = whole.shape[1] // parts
    return whole[:, part * n:(part + 1) * n].clone()


def reshard_memory(states: list[dict[str, Any]], part: int, parts: int) -> dict[str, Any]:
    """{pipeline, memory: {stream: {lane set: {layer: (lanes, m, D)}}}} of the old SP ranks, in order -> this
    rank's (slice ``part`` of ``parts``)."""
    first = states[0]["memory"]
    memory = {}
    for stream, by_key in first.items():
        memory[stream] = {}
        for key, by_layer in by_key.items():
            by_layer = dict(enumerate(by_layer)) if isinstance(by_layer, (list, tuple)) else by_layer
            memory[stream][key] = {
                layer: _reslice([s["memory"][stream][key][layer] for s in states], part, parts)
                for layer in by_layer}
    return {"pipeline": states[0]["pipeline"], "memory": memory}


def resharded_state(states: list[dict[str, Any]], saved_sp: int, sp_rank: int, sp: int) -> dict[str, Any]:
    """This rank's run state (data, memory, rng) from the run states of the old SP ranks of its lanes."""
    return {"data": states[0]["data"], "memory": reshard_memory([s["memory"] for s in states], sp_rank, sp),
            "rng": states[sp_rank * saved_sp // sp]["rng"]}
