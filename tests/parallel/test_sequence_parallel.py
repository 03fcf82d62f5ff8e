"""Sequence parallelism (DeepSpeed-Ulysses, --sequence-parallel-size) trains like one process.

As parallel/test_parallel_equivalence.py: a gloo group trains STEPS consecutive segments with memory and is compared
with one process (losses 1e-5 relative, every parameter gradient 1e-4, the evaluation sums), here with each
segment's tokens split over the SP ranks; alone and with TP, PP, ZeRO 1-3, recomputation, attention dropout and the
fused kernels (under Triton's interpreter).
"""

from __future__ import annotations

import os

import pytest
from distributed import run_distributed
from equivalence_helpers import assert_bf16_close, assert_same_training, load_ranks, train_and_record

pytestmark = pytest.mark.slow
TRAIN_EVAL = {"zero": 0, "evals": True}


def _train(rank, world, out_dir, tp, pp, plans, kwargs):
    train_and_record(rank, world, out_dir, tp, pp, plans, **kwargs)


def _spawn(tmp_path, world: int, tp: int, pp: int, sp: int, plans: list[dict], timeout: float = 200.0, **kwargs):
    os.makedirs(tmp_path, exist_ok=True)
    run_distributed(_train, world, str(tmp_path), tp, pp, plans, dict(kwargs, sp=sp), timeout=timeout)
    return load_ranks(str(tmp_path), world)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("baseline"), 1, 1, 1, 1, [TRAIN_EVAL], timeout=120)


@pytest.mark.timeout(300)
def test_sequence_parallel_matches_one_process(baseline, tmp_path):
    plans = [{**TRAIN_EVAL, "memory_roundtrip": True}, {"zero": 0, "evals": True, "ckpt": True},
             {"zero": 0, "evals": True, "selective": True}, {"bf16": True, "evals": True, "grads": False}]
    ranks = _spawn(tmp_path, 2, 1, 1, 2, plans, timeout=280)
    for run in range(3):
        assert_same_training(baseline, ranks, run)
    assert_bf16_close(baseline, ranks, 3)


@pytest.mark.timeout(300)
def test_sequence_parallel_with_zero_stages(baseline, tmp_path):
    plans = [{"zero": stage, "evals": True} for stage in (1, 2, 3)]
    plans[1]["resume_at"] = 2  # save, restart, load: ZeRO 2's partitions over DP x SP
    ranks = _spawn(tmp_path, 2, 1, 1, 2, plans, timeout=280)
    for run in range(len(plans)):
        assert_same_training(baseline, ranks, run)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["sp2-tp2", "sp2-pp2"])
def test_sequence_parallel_with_tensor_or_pipeline_parallelism(baseline, tmp_path, tp, pp):
    ranks = _spawn(tmp_path, 4, tp, pp, 2, [{"zero": 1 if pp > 1 else 0, "evals": True}], timeout=280)
    assert_same_training(baseline, ranks, 0)


@pytest.mark.timeout(300)
def test_attention_dropout_per_head_shard_as_tensor_parallelism_draws_it(tmp_path):
    """The attention dropout stream follows the head shard: SP=2 draws the masks TP=2 does (hidden dropout 0)."""
    overrides = {"attention_dropout": 0.2}
    tp2 = _spawn(tmp_path / "tp", 2, 2, 1, 1, [TRAIN_EVAL], config_overrides=overrides)
    sp2 = _spawn(tmp_path / "sp", 2, 1, 1, 2, [TRAIN_EVAL], config_overrides=overrides)
    assert_same_training(tp2, sp2, 0)


@pytest.mark.timeout(600)
def test_sequence_parallel_with_the_fused_kernels(tmp_path):
    wide = {"hidden_size": 64, "ffn_hidden_size": 128}  # the kernels need a head dim of at least 16
    base = _spawn(tmp_path / "one", 1, 1, 1, 1, [TRAIN_EVAL], config_overrides=wide)
    ranks = _spawn(tmp_path / "sp", 2, 1, 1, 2, [TRAIN_EVAL], timeout=560,
                   config_overrides={**wide, "attention_impl": "fused"})
    assert_same_training(base, ranks, 0)


@pytest.mark.timeout(300)
def test_megatron_sequence_parallel_inside_tensor_parallelism(baseline, tmp_path):
    """--sequence-parallel: the residual stream split within TP=2; the numbers of TP alone (= one process)."""
    plans = [{**TRAIN_EVAL, "memory_roundtrip": True}, {"zero": 1, "evals": True, "ckpt": True},
             {"zero": 3, "evals": True}, {"bf16": True, "evals": True, "grads": False}]
    ranks = _spawn(tmp_path, 2, 2, 1, 1, plans, timeout=280, sequence_parallel=True)
    for run in range(3):
        assert_same_training(baseline, ranks, run)
    assert_bf16_close(baseline, ranks, 3)
