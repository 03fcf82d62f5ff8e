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


@pytest.mark.timeout(400)
def test_a_resume_with_another_sp_degree_continues_the_run(data, tmp_path):
    """SP 2 -> 1 and 1 -> 2 halfway: the memory cache resharded, the losses those of one process throughout (no
    dropout: masks are drawn per shard). ZeRO 1-3 are refused (DeepSpeed will not repartition): test_sp_reshard."""
    args = ["--data-path", data, *TINY, "--dropout", "0"]
    whole, down, up = str(tmp_path / "whole"), str(tmp_path / "down"), str(tmp_path / "up")
    assert run([*args, "--train-iters", "6", "--save", whole]).returncode == 0
    _ranks([*args, *SP2, "--train-iters", "3", "--save", down])
    r = run([*args, "--train-iters", "6", "--save", down, "--load", down])
    assert r.returncode == 0, r.stderr[-3000:]
    assert _close(train_losses(down), train_losses(whole)), (train_losses(down), train_losses(whole))
    assert run([*args, "--train-iters", "3", "--save", up]).returncode == 0
    _ranks([*args, *SP2, "--train-iters", "6", "--save", up, "--load", up])
    assert _close(train_losses(up), train_losses(whole)), (train_losses(up), train_losses(whole))


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
