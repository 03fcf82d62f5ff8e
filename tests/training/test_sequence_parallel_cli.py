"""--sequence-parallel-size through pretrain_char_lm.py: a run, its exact resume, its checkpoint read by --finetune
and the tools, and the bad combinations refused with one line on every rank."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from training_utils import ROOT, TINY, env, error_lines, make_shards, run, spawn_ranks, train_losses, wait_all

pytestmark = pytest.mark.slow
SP2 = ["--sequence-parallel-size", "2", "--eval-iters", "2", "--log-interval", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_shards(str(tmp_path_factory.mktemp("data") / "pydoc"))


def _ranks(args: list[str], world: int = 2) -> list[tuple[int, str, str]]:
    results = wait_all(spawn_ranks(args, world=world), timeout=240)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    return results


@pytest.mark.timeout(400)
def test_a_sequence_parallel_run_resumes_exactly_and_its_checkpoint_is_read(data, tmp_path):
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    out = _ranks(["--data-path", data, *TINY, *SP2, "--train-iters", "6", "--save", whole])
    assert "world 2 = TP 1 x SP 2 x PP 1 x DP 1" in out[0][1]
    _ranks(["--data-path", data, *TINY, *SP2, "--train-iters", "3", "--save", part])
    _ranks(["--data-path", data, *TINY, *SP2, "--train-iters", "6", "--save", part, "--load", part])
    assert train_losses(part) == train_losses(whole)  # bitwise: memory shards, lanes and RNG restored
    # Its weights start a one-process phase, and the tools read it like any checkpoint.
    r = run(["--data-path", data, *TINY, "--train-iters", "1", "--load", whole, "--finetune"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "--load", whole,
                        "--output", str(tmp_path / "c")], env=env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]


def _close(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    return [i for i, _ in a] == [i for i, _ in b] and all(abs(x - y) <= 1e-5 * abs(y) for (_, x), (_, y) in zip(a, b))


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> list[tuple[int, float]]:
    """The losses of 6 iterations in one process, no dropout (SP shards draw their own masks)."""
    save = str(tmp_path_factory.mktemp("whole"))
    assert run(["--data-path", data, *TINY, "--dropout", "0", "--train-iters", "6", "--save", save]).returncode == 0
    return train_losses(save)


def _resume_across(data: str, folder: str, before: int, after: int, zero: int, model: int = 1,
                   layout: tuple[str, ...] = ()) -> list[tuple[int, float]]:
    """3 iterations at SP ``before``, 3 more at SP ``after``, ZeRO ``zero``; ``layout``: TP/PP flags whose product
    is ``model`` (one process when that and SP are 1)."""
    args = ["--data-path", data, *TINY, "--dropout", "0", "--zero-stage", str(zero), *layout, "--save", folder]
    for sp, iters, load in ((before, "3", []), (after, "6", ["--load", folder])):
        if sp * model == 1:
            r = run([*args, "--train-iters", iters, *load])
            assert r.returncode == 0, r.stderr[-3000:]
        else:
            _ranks([*args, "--sequence-parallel-size", str(sp), "--train-iters", iters, *load], world=sp * model)
    assert not [n for n in os.listdir(folder) if n.startswith(".")], os.listdir(folder)  # no universal copy left
    return train_losses(folder)


@pytest.mark.timeout(400)
def test_a_resume_with_another_sp_degree_continues_the_run(data, one_process, tmp_path):
    """SP 2 -> 1 and 1 -> 2 halfway: the memory cache resharded, the losses those of one process throughout."""
    for before, after in ((2, 1), (1, 2)):
        losses = _resume_across(data, str(tmp_path / f"sp{before}to{after}"), before, after, zero=0)
        assert _close(losses, one_process), (before, after, losses, one_process)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("zero,before,after", [(1, 2, 1), (2, 1, 2), (3, 2, 1)])
def test_zero_partitions_are_recut_for_another_sp_degree(data, one_process, tmp_path, zero, before, after):
    """ZeRO shards the optimizer (ZeRO-3 also the weights) over DP x SP: a resume with another SP degree goes
    through DeepSpeed's universal checkpoint, converted beside the checkpoint and removed after the load."""
    losses = _resume_across(data, str(tmp_path / "run"), before, after, zero)
    assert _close(losses, one_process), (losses, one_process)


@pytest.mark.timeout(400)
def test_zero_recut_with_pipeline_or_tensor_parallelism(data, one_process, tmp_path):
    """The universal checkpoint with pipeline stages (PP 2, ZeRO-1) and tensor-parallel slices (TP 2, ZeRO-2)."""
    losses = _resume_across(data, str(tmp_path / "pp"), 2, 1, 1, 2, ("--pipeline-model-parallel-size", "2"))
    assert _close(losses, one_process), (losses, one_process)
    tp = ("--tensor-model-parallel-size", "2", "--num-attention-heads", "4")  # Ulysses: SP divides heads per rank
    whole = str(tmp_path / "whole")
    r = run(["--data-path", data, *TINY, "--dropout", "0", "--num-attention-heads", "4", "--train-iters", "6",
             "--save", whole])
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _resume_across(data, str(tmp_path / "tp"), 2, 1, 2, 2, tp)
    assert _close(losses, train_losses(whole)), (losses, train_losses(whole))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("extra,message", [
    (["--seq-length", "40", "--chunk-size", "8"], "--sequence-parallel-size (2) must divide the chunks of a segment"),
    (["--num-attention-heads", "2", "--tensor-model-parallel-size", "2"], "must divide the heads per tensor-parallel "
                                                                          "rank (1)"),
    (["--attention-impl", "reference"], "does not run the 'reference' attention"),
    (["--mem-length", "16"], "needs --mem-length 0 or equal to --seq-length"),
    (["--sequence-parallel"], "--sequence-parallel splits the tokens within the tensor-parallel group: it needs"),
])
def test_bad_combinations_are_one_line_on_every_rank(data, extra, message):
    world = 4 if "--tensor-model-parallel-size" in extra else 2
    results = wait_all(spawn_ranks(["--data-path", data, *TINY, *SP2, "--train-iters", "2", *extra], world=world),
                       timeout=200)
    for rc, _, err in results:
        lines = error_lines(err)
        assert rc == 1 and len(lines) == 1 and message in lines[0], err[-2000:]
