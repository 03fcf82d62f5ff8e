"""What runs on which GPU, decided on the CPU with a faked CUDA device (docs/V100.md):

- `attention_impl="auto"` picks the fused Triton kernels from compute capability 8.0 (A100, H100) and the blocked
  path on a V100 (7.0), where Triton has no tensor-core products; the CPU stays on blocked;
- the start-up memory estimate and the run's banner follow that choice;
- bf16 is refused on a V100 and fp16 is accepted there, with DeepSpeed's dynamic loss scaling in the config;
- fp16 on the CPU fails at start with one line.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from training_utils import ROOT, SCRIPT, TINY, env, error_lines, make_shards

import megatron_ls.kernels.availability as availability
from megatron_ls.errors import ConfigError
from megatron_ls.model import TransformerLSConfig
from megatron_ls.model.attention import auto_impl, resolve_impl
from megatron_ls.training import arguments
from megatron_ls.training.arguments import finalize_args, parse_args
from megatron_ls.training.ds_config import FP16_LOSS_SCALING, build_ds_config
from megatron_ls.training.loop import _core_impl
from megatron_ls.training.memory_check import training_layout

CUDA = torch.device("cuda")


@pytest.fixture
def gpu(monkeypatch):
    """fake(major, minor): torch (and the training flags) see one CUDA device of that compute capability."""

    def fake(major: int, minor: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(arguments, "_cuda", lambda: True)

    return fake


@pytest.mark.parametrize("capability,expected", [((7, 0), "blocked"), ((7, 5), "blocked"), ((8, 0), "fused"),
                                                 ((8, 6), "fused"), ((9, 0), "fused")])
def test_auto_picks_by_compute_capability(gpu, capability, expected):
    gpu(*capability)
    assert auto_impl(CUDA) == resolve_impl("auto", CUDA) == resolve_impl("auto", "cuda") == expected
    assert resolve_impl("auto", "cpu") == "blocked"
    assert resolve_impl("fused", CUDA) == "fused" and resolve_impl("blocked", CUDA) == "blocked"  # by name: as named


def test_auto_without_triton_or_a_gpu_is_blocked(gpu, monkeypatch):
    gpu(9, 0)
    monkeypatch.setattr(availability, "triton_importable", lambda: False)
    assert auto_impl(CUDA) == "blocked"
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_impl(CUDA) == "blocked" and auto_impl("cpu") == "blocked"


@pytest.mark.parametrize("capability,core,estimated", [((7, 0), "blocked", "blocked"),
                                                       ((9, 0), "fused", "fused-table"),
                                                       ((9, 0), "fused", "fused")])
def test_memory_estimate_and_banner_follow_the_choice(gpu, monkeypatch, capability, core, estimated):
    """The estimate counts the fused path's window-position table only in table mode (the default)."""
    if estimated == "fused":
        monkeypatch.setenv("MEGATRON_LS_WINDOW_POS", "band")
    gpu(*capability)
    args = finalize_args(parse_args(["--data-path", "x", "--train-iters", "1", "--preset", "enwik8-30l",
                                     "--fp16" if capability < (8, 0) else "--bf16"]), world_size=8)
    cfg = build_ds_config(args, on_cpu=False)
    config = TransformerLSConfig.from_preset("enwik8-30l")
    assert training_layout(args, config, cfg, "cuda").attention_impl == estimated
    assert training_layout(args, config, cfg, "cpu").attention_impl == "blocked"
    assert _core_impl(config, CUDA) == f"auto ({core})"
    assert _core_impl(TransformerLSConfig.from_preset("enwik8-30l", attention_impl="fused"), CUDA) == "fused"


def test_bf16_is_refused_on_a_v100_and_fp16_gets_dynamic_loss_scaling(gpu):
    gpu(7, 0)
    base = ["--data-path", "x", "--train-iters", "1", "--seq-length", "64"]
    args = finalize_args(parse_args(base + ["--bf16"]), world_size=1)
    with pytest.raises(ConfigError, match=r"bf16 .* needs a GPU of compute capability >= 8.0; this one is sm_70 .* "
                                          r"use --fp16"):
        build_ds_config(args, on_cpu=False)  # where the run's settings are completed and checked
    args = finalize_args(parse_args(base + ["--fp16"]), world_size=1)
    cfg = build_ds_config(args, on_cpu=False)
    assert cfg["fp16"] == {"enabled": True, **FP16_LOSS_SCALING} and cfg["fp16"]["loss_scale"] == 0  # 0 = dynamic
    from deepspeed.runtime.config import DeepSpeedConfig

    scaler = DeepSpeedConfig(cfg).float16_config  # how DeepSpeed reads the section: dynamic scaling from 2^11
    assert scaler.enabled and scaler.loss_scale == 0
    assert scaler.dynamic_loss_scale_args() == {"init_scale": 2**11, "scale_window": 500, "delayed_shift": 2,
                                                "consecutive_hysteresis": False, "min_scale": 1}
    gpu(8, 0)
    args = finalize_args(parse_args(base + ["--bf16"]), world_size=1)
    cfg = build_ds_config(args, on_cpu=False)
    assert cfg["bf16"]["enabled"] and cfg["fp16"] == {"enabled": False}  # no loss-scaling keys without fp16


def test_fp16_settings_of_a_user_json_are_kept_and_checked(gpu, tmp_path):
    gpu(7, 0)
    path = tmp_path / "ds.json"
    path.write_text('{"fp16": {"enabled": true, "initial_scale_power": 16, "hysteresis": 4}}')
    args = finalize_args(parse_args(["--data-path", "x", "--train-iters", "1", "--seq-length", "64",
                                     "--deepspeed_config", str(path)]), world_size=1)
    fp16 = build_ds_config(args, on_cpu=False)["fp16"]
    assert args.fp16 and fp16["initial_scale_power"] == 16 and fp16["hysteresis"] == 4 and fp16["loss_scale"] == 0
    path.write_text('{"fp16": {"enabled": true, "loss_scale": -1}}')
    args = finalize_args(parse_args(["--data-path", "x", "--train-iters", "1", "--seq-length", "64",
                                     "--deepspeed_config", str(path)]), world_size=1)
    with pytest.raises(ConfigError, match=r"fp16.loss_scale must be a finite number >= 0, got -1"):
        build_ds_config(args, on_cpu=False)


@pytest.mark.timeout(180)
def test_fp16_on_the_cpu_fails_at_start_with_one_line(tmp_path):
    data = make_shards(str(tmp_path / "data" / "default"))
    r = subprocess.run([sys.executable, SCRIPT, "--data-path", data, *TINY, "--train-iters", "1", "--fp16"],
                       env=env(), capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    (line,) = error_lines(r.stderr)
    assert "fp16 (--fp16, or fp16.enabled in --deepspeed_config) needs a CUDA GPU" in line
