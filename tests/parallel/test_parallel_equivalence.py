"""Every parallel layout trains the real Transformer-LS LM like one process does (DESIGN.md section 4).

Each test spawns a gloo group (tests/distributed.py, hard timeout) that trains STEPS steps of consecutive segments,
so the memory carries from step to step, and compares with one process: losses within 1e-5 relative, gradients
(reduced over DP, gathered over TP and PP, before clipping; clipping is active) within 1e-4, plus the evaluation
sums. bf16 runs follow the fp32 baseline within bf16's precision. The one-process baseline runs once per module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from distributed import free_port, run_distributed
from equivalence_helpers import (
    STEPS,
    assert_bf16_close,
    assert_same_training,
    load_ranks,
    merged_grads,
    tiny_config,
    train_and_record,
)
from repo_paths import TESTS_DIR

pytestmark = pytest.mark.slow

TRAIN_EVAL = {"zero": 0, "evals": True}
BF16 = {"bf16": True, "evals": True, "grads": False}


def _spawn(tmp_path, world: int, tp: int, pp: int, plans: list[dict], timeout: float = 180.0, **kwargs):
    run_distributed(_train, world, str(tmp_path), tp, pp, plans, kwargs, timeout=timeout)
    return load_ranks(str(tmp_path), world)


def _train(rank, world, out_dir, tp, pp, plans, kwargs):
    train_and_record(rank, world, out_dir, tp, pp, plans, **kwargs)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One process: run 0 the reference (evaluating after each step); the other runs check the baseline itself."""
    plans = [TRAIN_EVAL, {"zero": 0, "grads": False}, {"zero": 0, "grads": False, "reset_each_step": True}]
    return _spawn(tmp_path_factory.mktemp("baseline"), 1, 1, 1, plans, timeout=120)


@pytest.mark.timeout(150)
def test_baseline_uses_memory_and_eval_keeps_it_apart(baseline):
    ref, no_eval, no_memory = (baseline[0]["results"][i] for i in range(3))
    # Evaluation between steps (its own memory) leaves training bit-identical.
    assert ref["losses"] == no_eval["losses"]
    # The memory matters: forgetting it changes the later steps (so the tests below do exercise it).
    assert ref["losses"][0] == no_memory["losses"][0]
    assert all(abs(a - b) > 1e-4 for a, b in zip(ref["losses"][1:], no_memory["losses"][1:]))
    assert len(ref["grads"]) == STEPS and ref["norms"][0] > 1.0  # > gradient_clipping: clipping is active
    assert [n for _, n in ref["evals"]] == [4 * 16] * STEPS


@pytest.mark.timeout(200)
def test_tensor_parallel_matches_one_process(baseline, tmp_path):
    ranks = _spawn(tmp_path, 2, 2, 1, [{**TRAIN_EVAL, "memory_roundtrip": True}, {**BF16, "zero": 0}])
    assert_same_training(baseline, ranks, 0)
    assert_bf16_close(baseline, ranks, 1)


@pytest.mark.timeout(200)
def test_pipeline_parallel_matches_one_process(baseline, tmp_path):
    # ZeRO 0 (our own clipping) and ZeRO 1 (DeepSpeed's); the second run also saves, restarts and resumes.
    ranks = _spawn(tmp_path, 2, 1, 2, [TRAIN_EVAL, {"zero": 1, "evals": True, "resume_at": 2}, {**BF16, "zero": 1}])
    assert_same_training(baseline, ranks, 0)
    assert_same_training(baseline, ranks, 1)
    assert_bf16_close(baseline, ranks, 2)


@pytest.mark.timeout(240)
def test_loss_weights_train_alike_with_and_without_pipelines(baseline, tmp_path):
    # --loss-weight scales each target's loss in the local path (one process) and in the pipeline's loss function.
    weighted = {"zero": 0, "evals": True, "loss_weights": True}
    (tmp_path / "one").mkdir()
    (tmp_path / "pp").mkdir()
    one = _spawn(tmp_path / "one", 1, 1, 1, [weighted], timeout=120)
    assert_same_training(one, _spawn(tmp_path / "pp", 2, 1, 2, [weighted]), 0)
    plain, got = baseline[0]["results"][0], one[0]["results"][0]
    assert all(abs(a - b) > 1e-3 for a, b in zip(got["losses"], plain["losses"]))  # the weights act


@pytest.mark.timeout(240)
def test_pipeline_x_tensor_parallel_matches_one_process(baseline, tmp_path):
    ranks = _spawn(tmp_path, 4, 2, 2, [{"zero": 1, "evals": True, "memory_roundtrip": True}], timeout=220)
    assert_same_training(baseline, ranks, 0)


@pytest.mark.timeout(240)
def test_data_parallel_zero_stages_match_one_process(baseline, tmp_path):
    plans = [{"zero": stage, "evals": True} for stage in (0, 1, 2, 3)]
    plans[2]["resume_at"] = 2  # ZeRO 2 checkpoints are partitioned: save, restart and load too
    ranks = _spawn(tmp_path, 2, 1, 1, plans + [{**BF16, "zero": 1}, {**BF16, "zero": 3}], timeout=220)
    for run in range(len(plans)):
        assert_same_training(baseline, ranks, run)
    assert_bf16_close(baseline, ranks, len(plans))
    assert_bf16_close(baseline, ranks, len(plans) + 1)


def _assert_identical(ranks, a: int, b: int) -> None:
    for r in ranks:
        ra, rb = r["results"][a], r["results"][b]
        assert ra["losses"] == rb["losses"]
        # Checkpointing really happened: every attention ran twice (forward, then recompute in the backward).
        assert rb["attention_calls"] == 2 * ra["attention_calls"] > 0
    for step in range(STEPS):
        ga, gb = merged_grads(ranks, a, step), merged_grads(ranks, b, step)
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], rtol=0, atol=0, msg=name)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_activation_checkpointing_is_exact_with_dropout(tp, pp, tmp_path):
    # TP=2 exercises the tracked (sharded) dropout stream through deepspeed.checkpointing; PP=2 the stage wrappers.
    ranks = _spawn(tmp_path, 2, tp, pp, [{"zero": 0, "ckpt": False}, {"zero": 0, "ckpt": True}],
                   config_overrides={"dropout": 0.3, "attention_dropout": 0.1})
    _assert_identical(ranks, 0, 1)
    off = ranks[0]["results"][0]
    assert len(set(off["losses"])) == STEPS  # the run trains (dropout differs per step)


# ---- bad layouts: one clear error on every rank, before any collective, never a hang ------------------------------
def _bad_layouts(rank: int, world: int, out_dir: str) -> None:
    from equivalence_helpers import ds_config

    from megatron_ls.errors import ParallelConfigError
    from megatron_ls.training.distributed import init_distributed
    from megatron_ls.training.engine import build_engine

    config = tiny_config()  # 4 heads, 2 layers; world = 3
    cases = [((3, 1), "must divide --num-attention-heads (4)"),
             ((1, 3), "--pipeline-model-parallel-size (3) exceeds --num-layers (2)"),
             ((2, 1), "world size 3 is not divisible by --tensor-model-parallel-size (2)")]
    for (tp, pp), message in cases:
        with pytest.raises(ParallelConfigError, match=r".*" + message.replace("(", r"\(").replace(")", r"\)")):
            init_distributed(tp, pp, config)
    # A valid 3-stage pipeline, but ZeRO 2 is DeepSpeed's no-go with pipelines: refused before DeepSpeed starts.
    deep = tiny_config(num_layers=3)
    layout = init_distributed(1, 3, deep)
    with pytest.raises(ParallelConfigError, match="--zero-stage 2 cannot be used with pipeline parallelism"):
        build_engine(deep, ds_config(2, 1, layout.dp), layout, seed=0)


@pytest.mark.timeout(120)
def test_bad_layouts_fail_on_every_rank(tmp_path):
    # A rank that did not raise would wait in a collective for the others: the timeout would fail the test.
    run_distributed(_bad_layouts, 3, str(tmp_path), timeout=100)


@pytest.mark.timeout(120)
def test_bad_layout_under_a_launcher_environment_exits_cleanly(tmp_path):
    """As `deepspeed` starts them: only env vars, no process group yet; every rank must exit 1 with the message."""
    tests_dir = TESTS_DIR  # equivalence_helpers lives there
    code = (f"import sys; sys.path.insert(0, {tests_dir!r})\n"
            "from equivalence_helpers import tiny_config\n"
            "from megatron_ls.training.distributed import init_distributed\n"
            "init_distributed(2, 1, tiny_config())\n")
    port = free_port()
    procs = []
    for rank in range(3):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="3", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 90
    outputs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rc, err in outputs:
        assert rc != 0
        assert "ParallelConfigError: world size 3 is not divisible by --tensor-model-parallel-size (2)" in err, err
