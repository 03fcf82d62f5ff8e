"""Resharding the run state of a checkpoint to another --sequence-parallel-size (training/sp_reshard.py), and
which layout changes a resume accepts (training/checkpointing.check_compatible)."""

from __future__ import annotations

import pytest
import torch

from megatron_ls.errors import CheckpointError
from megatron_ls.parallel.layout import ParallelLayout
from megatron_ls.training.checkpointing import check_compatible
from megatron_ls.training.sp_reshard import old_ranks, resharded_state


def _memory(whole: dict[int, torch.Tensor], part: int, parts: int) -> dict:
    """The run state an SP rank saves: its slice of every layer's memory, (lanes, M / K, D)."""
    n = next(iter(whole.values())).shape[1] // parts
    sliced = {layer: t[:, part * n:(part + 1) * n].clone() for layer, t in whole.items()}
    return {"data": {"step": 3}, "rng": {"rank": part},
            "memory": {"pipeline": False, "memory": {"train": {0: sliced, 1: sliced}}}}


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_each_new_rank_gets_its_slice_of_the_memory_laid_end_to_end(old, new):
    whole = {0: torch.randn(2, 16, 3), 1: torch.randn(2, 16, 3)}
    states = [_memory(whole, p, old) for p in range(old)]
    for part in range(new):
        state = resharded_state(states, old, part, new)
        assert state["data"] == {"step": 3}
        assert state["rng"] == {"rank": part * old // new}  # the old rank whose slice holds the new one's start
        for layer in whole:
            expect = _memory(whole, part, new)["memory"]["memory"]["train"][0][layer]
            assert torch.equal(state["memory"]["memory"]["train"][0][layer], expect)


def test_the_old_ranks_of_a_lane_are_those_with_its_tp_dp_and_pp_coordinates():
    saved = ParallelLayout(8, tp=2, sp=2)  # dp 2
    now = ParallelLayout(4, tp=2)  # dp 2
    for rank in range(4):
        c = now.coordinates(rank)
        ranks = old_ranks(saved, now, rank)
        assert [saved.coordinates(r).sp_rank for r in ranks] == [0, 1]
        assert {(saved.coordinates(r).tp_rank, saved.coordinates(r).dp_rank) for r in ranks} == {(c.tp_rank,
                                                                                                  c.dp_rank)}


MODEL = {"vocab_size": 256, "num_layers": 2}


def _info(sp: int, world: int, **layout) -> dict:
    return {"model": MODEL, "world_size": world, "run": {"zero_stage": 0},
            "layout": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                       "sequence_parallel_size": sp, **layout}}


def _run(sp: int, world: int, **extra) -> dict:
    return {"zero_stage": 0, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
            "sequence_parallel_size": sp, "world_size": world, **extra}


def test_another_sp_degree_resumes_but_another_data_parallel_degree_does_not():
    check_compatible(_info(2, 2), MODEL, _run(1, 1), False, "ck")  # SP 2 -> 1, DP 1 both
    check_compatible(_info(1, 2), MODEL, _run(2, 4), False, "ck")  # SP 1 -> 2, DP 2 both
    check_compatible(dict(_info(2, 2), run={"zero_stage": 3}), MODEL, _run(1, 1, zero_stage=3), False, "ck")  # ZeRO
    with pytest.raises(CheckpointError, match="saved by 2 processes, this run has 2"):
        check_compatible(_info(2, 2), MODEL, _run(1, 2), False, "ck")  # DP 1 -> 2


@pytest.mark.parametrize("run,message", [
    (_run(1, 1, bf16=True, pipeline_model_parallel_size=2, world_size=2), "DeepSpeed.s bf16 pipeline optimizer"),
])
def test_a_reshard_deepspeed_cannot_do_is_one_line(run, message):
    info = _info(2, 2 * run["pipeline_model_parallel_size"], pipeline_model_parallel_size=run[
        "pipeline_model_parallel_size"])
    with pytest.raises(CheckpointError, match=f"--sequence-parallel-size 2, this run has 1: {message}.*--finetune"):
        check_compatible(info, MODEL, run, False, "ck")


def test_megatron_sequence_parallel_must_match():
    with pytest.raises(CheckpointError, match="saved with --sequence-parallel on, this run has off"):
        check_compatible(_info(1, 2, tensor_model_parallel_size=2, sequence_parallel=True), MODEL,
                         _run(1, 2, tensor_model_parallel_size=2), False, "ck")
