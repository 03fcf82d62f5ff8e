"""training/checkpointing.py without DeepSpeed: save, load, pruning, RNG states, manifests, damaged files."""

from __future__ import annotations

import os

import pytest
import torch
from distributed import run_distributed
from fake_engine import FakeEngine

from megatron_ls.checkpoint import files
from megatron_ls.errors import CheckpointError
from megatron_ls.training import checkpointing as ckpt


# ---- checkpoints (a stand-in for DeepSpeed's file writing) ------------------------------------
def test_save_load_prune_and_rng(tmp_path):
    d = str(tmp_path / "ck")
    for it in (2, 4, 6):
        ckpt.save_checkpoint(FakeEngine(it), d, it, {"data": {"step": it}, "rng": ckpt.rng_state()},
                             {"model": {}, "run": {}}, keep_last=2)
    assert [t for _, t in files.complete_tags(d)] == ["iter_0000004", "iter_0000006"]
    assert open(os.path.join(d, "latest")).read().strip() == "iter_0000006"
    path, info = ckpt.locate_checkpoint(d)
    assert info["iteration"] == 6
    eng = FakeEngine()
    ckpt.load_engine_state(eng, path, finetune=False)
    local = ckpt.load_local_state(path)
    assert eng.value == 6 and local["data"]["step"] == 6
    ckpt.set_rng_state(local["rng"])
    a = torch.rand(3)
    torch.manual_seed(0)
    ckpt.set_rng_state(local["rng"])
    assert torch.equal(a, torch.rand(3))


def test_interrupted_save_keeps_previous(tmp_path):
    d = str(tmp_path / "ck")
    ckpt.save_checkpoint(FakeEngine(1), d, 1, {}, {})
    os.makedirs(os.path.join(d, "iter_0000002.partial"))  # what a crash mid-save leaves
    path, info = ckpt.locate_checkpoint(d)
    assert info["iteration"] == 1 and path.endswith("iter_0000001")
    ckpt.save_checkpoint(FakeEngine(3), d, 3, {}, {})
    assert not os.path.exists(os.path.join(d, "iter_0000002.partial"))


def _load_fails_on_rank1(rank: int, world: int, path: str) -> None:
    class Engine(FakeEngine):
        def load_checkpoint(self, load_dir, tag, load_optimizer_states=True, load_module_only=False, universal=False):
            if rank == 1:
                raise RuntimeError("size mismatch for embedding.weight")
            return super().load_checkpoint(load_dir, tag, load_optimizer_states, load_module_only)

    with pytest.raises(CheckpointError) as e:
        ckpt.load_engine_state(Engine(), path, finetune=False)
    assert "DeepSpeed could not load" in str(e.value) and "size mismatch" in str(e.value)
    if rank == 0:
        assert "failed on rank 1" in str(e.value)


@pytest.mark.timeout(120)
def test_engine_load_failing_on_one_rank_fails_on_every_rank(tmp_path):
    d = str(tmp_path / "ck")
    ckpt.save_checkpoint(FakeEngine(1), d, 1, {}, {})
    run_distributed(_load_fails_on_rank1, 2, os.path.join(d, "iter_0000001"), timeout=100)


@pytest.mark.parametrize("damage,match", [
    ("no-dir", "checkpoint directory not found"),
    ("no-latest", "no checkpoint there"),
    ("latest-dangling", "does not exist"),
    ("truncate", "has .* bytes"),
    ("flip", "CRC-32"),
    ("no-manifest", "incomplete"),
    ("missing-file", "is missing"),
])
def test_damaged_checkpoints(tmp_path, damage, match):
    d = str(tmp_path / "ck")
    ckpt.save_checkpoint(FakeEngine(1), d, 1, {}, {})
    tagdir = os.path.join(d, "iter_0000001")
    weights = os.path.join(tagdir, "mp_rank_00_model_states.pt")
    if damage == "no-dir":
        d = str(tmp_path / "nothing")
    elif damage == "no-latest":  # and no complete checkpoint either (one left is read: test_latest_recovery.py)
        os.remove(os.path.join(d, "latest"))
        os.remove(os.path.join(tagdir, "manifest.json"))
    elif damage == "latest-dangling":
        open(os.path.join(d, "latest"), "w").write("iter_0000009\n")
    elif damage == "truncate":
        os.truncate(weights, 10)
    elif damage == "flip":
        data = bytearray(open(weights, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(weights, "wb").write(bytes(data))
    elif damage == "no-manifest":
        os.remove(os.path.join(tagdir, "manifest.json"))
    elif damage == "missing-file":
        os.remove(weights)
    with pytest.raises(CheckpointError, match=match):
        ckpt.locate_checkpoint(d)


def test_compatibility_checks():
    info = {"model": {"hidden_size": 64, "num_layers": 2, "mem_length": 64}, "world_size": 2,
            "layout": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1},
            "run": {"seq_length": 64, "global_batch_size": 4}}
    run = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "world_size": 2, "seq_length": 64,
           "global_batch_size": 4}
    ckpt.check_compatible(info, {"hidden_size": 64, "num_layers": 2, "mem_length": 64}, run, False, "p")
    with pytest.raises(CheckpointError, match="hidden_size = 64, this run has 32"):
        ckpt.check_compatible(info, {"hidden_size": 32, "num_layers": 2}, run, True, "p")
    with pytest.raises(CheckpointError, match="use --finetune"):
        ckpt.check_compatible(info, {"hidden_size": 64, "num_layers": 2, "mem_length": 64},
                              dict(run, seq_length=128), False, "p")
    ckpt.check_compatible(info, {"hidden_size": 64, "num_layers": 2, "mem_length": 128},
                          dict(run, seq_length=128, world_size=1), True, "p")
    model = {"hidden_size": 64, "num_layers": 2, "mem_length": 64}
    with pytest.raises(CheckpointError, match="was saved with --zero-stage 1, this run has 2"):
        ckpt.check_compatible(dict(info, run=dict(info["run"], zero_stage=1)), model, dict(run, zero_stage=2),
                              False, "p")
    with pytest.raises(CheckpointError, match="was saved with --bf16 off, this run has on"):
        ckpt.check_compatible(dict(info, run=dict(info["run"], bf16=False)), model, dict(run, bf16=True), False, "p")
    other_tp = dict(run, tensor_model_parallel_size=2)
    with pytest.raises(CheckpointError, match="exact resume needs the same layout; use --finetune"):
        ckpt.check_compatible(info, {"hidden_size": 64, "num_layers": 2, "mem_length": 64}, other_tp, False, "p")
    ckpt.check_compatible(info, {"hidden_size": 64, "num_layers": 2, "mem_length": 64}, other_tp, True, "p")


def test_foreign_checkpoint_is_weights_only(tmp_path):
    """A DeepSpeed checkpoint another tool wrote (no manifest, no run state): --finetune may read its weights."""
    d = tmp_path / "ck"
    (d / "global_step5").mkdir(parents=True)
    (d / "latest").write_text("global_step5")
    path, info = ckpt.locate_checkpoint(str(d), weights_only=True)
    assert path.endswith("global_step5") and info == {}
    with pytest.raises(CheckpointError, match="--finetune"):
        ckpt.locate_checkpoint(str(d))
