"""training/ds_config.py: the DeepSpeed JSON built from the flags, and a user's JSON merged into it."""

from __future__ import annotations

import json
import re

import pytest
from run_args import args_of

from megatron_ls.errors import ConfigError
from megatron_ls.training.ds_config import build_ds_config


# ---- DeepSpeed config -----------------------------------------------------------------------
def test_ds_config_from_flags():
    a = args_of("--micro-batch-size", "2", "--global-batch-size", "8", "--bf16", "--zero-stage", "1",
                "--lr", "1e-3", "--clip-grad", "0.5", world=2)
    cfg = build_ds_config(a, on_cpu=True)
    assert cfg["train_batch_size"] == 8 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 2 and a.gradient_accumulation_steps == 2
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["torch_adam"] is True
    assert cfg["optimizer"]["params"]["lr"] == 1e-3 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and cfg["zero_optimization"]["stage"] == 1
    assert cfg["scheduler"]["type"] == "WarmupLR" and cfg["steps_per_print"] >= 10**6


def _write(tmp_path, obj) -> str:
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(obj))
    return str(p)


def test_ds_config_fills_flags_and_keeps_extra_keys(tmp_path):
    path = _write(tmp_path, {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4,
                             "optimizer": {"type": "AdamW", "params": {"lr": 5e-4}},
                             "zero_optimization": {"stage": 2, "overlap_comm": True}, "wall_clock_breakdown": True})
    a = args_of("--deepspeed_config", path, world=2)
    cfg = build_ds_config(a, on_cpu=True)
    assert a.global_batch_size == 16 and a.micro_batch_size == 4 and a.lr == 5e-4 and a.zero_stage == 2
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["zero_optimization"]["overlap_comm"] is True
    assert cfg["wall_clock_breakdown"] is True and cfg["scheduler"]["params"]["warmup_max_lr"] == 5e-4


@pytest.mark.parametrize("obj,flags,match", [
    ({"train_batch_size": 16}, ["--global-batch-size", "8"],
     r"--global-batch-size 8 contradicts train_batch_size = 16"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, ["--lr", "2e-4"], "optimizer.params.lr = 0.0001"),
    ({"bf16": {"enabled": False}}, ["--bf16"], "bf16.enabled = False"),
    ({"zero_optimization": {"stage": 3}}, ["--zero-stage", "1"], "zero_optimization.stage = 3"),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {}}}, ["--lr-decay-style", "linear"], "scheduler.type"),
    ({"gradient_clipping": 1.0}, ["--clip-grad", "0.25"], "gradient_clipping = 1.0"),
    ({"gradient_accumulation_steps": 3}, ["--global-batch-size", "4"], "gradient_accumulation_steps = 3"),
])
def test_ds_config_conflicts(tmp_path, obj, flags, match):
    a = args_of("--deepspeed_config", _write(tmp_path, obj), *flags)
    with pytest.raises(ConfigError, match=match):
        build_ds_config(a, on_cpu=True)


@pytest.mark.parametrize("obj,match", [
    ({"bf16": {"enabled": "false"}}, 'bf16.enabled must be true or false, got "false"'),
    ({"zero_optimization": 2}, '"zero_optimization" must be a JSON object, got 2'),
    ({"optimizer": "AdamW"}, '"optimizer" must be a JSON object'),
    ({"train_batch_size": "4"}, 'train_batch_size must be a positive integer, got "4"'),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be a positive integer, got 0"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu must be a positive integer"),
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage must be 0, 1, 2 or 3, got 7"),
    ({"gradient_clipping": "1.0"}, "gradient_clipping must be a finite number"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "1e-3"}}}, "optimizer.params.lr must be a finite number"),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, "0.99"]}}}, "betas must be a list of two numbers"),
])
def test_ds_config_wrong_types_are_named(tmp_path, obj, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        build_ds_config(args_of("--deepspeed_config", _write(tmp_path, obj)), on_cpu=True)


@pytest.mark.parametrize("flags,match", [
    (["--adam-beta1", "1.5"], "--adam-beta1 must be in [0, 1), got 1.5"),
    (["--adam-beta2", "nan"], "--adam-beta2 must be in [0, 1)"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--adam-eps", "0"], "--adam-eps must be a finite number > 0"),
    (["--clip-grad", "nan"], "--clip-grad must be a finite number >= 0"),
])
def test_optimizer_values_are_checked(flags, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        build_ds_config(args_of(*flags), on_cpu=True)


def test_ds_config_bad_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_ds_config(args_of("--deepspeed_config", str(p)), on_cpu=True)
    with pytest.raises(ConfigError, match="file not found"):
        build_ds_config(args_of("--deepspeed_config", str(tmp_path / "none.json")), on_cpu=True)


def test_batch_divisibility():
    with pytest.raises(ConfigError, match="must be a multiple of --micro-batch-size"):
        build_ds_config(args_of("--global-batch-size", "6", "--micro-batch-size", "4", world=1), on_cpu=True)
