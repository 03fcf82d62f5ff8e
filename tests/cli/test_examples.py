"""The README's two commands and the paper's recipes in examples/: what a new user runs first, checked statically
(the commands themselves run in test_training_launcher.py and in CI)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch
from repo_paths import REPO_ROOT

from megatron_ls.model import TransformerLSConfig
from megatron_ls.training import arguments
from megatron_ls.training.arguments import finalize_args, parse_args
from megatron_ls.training.ds_config import FP16_LOSS_SCALING, build_ds_config
from megatron_ls.training.memory_check import HEADROOM, training_layout
from megatron_ls.training.memory_estimate import GiB, estimate_memory

ROOT = REPO_ROOT


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    text = open(os.path.join(ROOT, "README.md")).read()
    lines = text.splitlines()
    assert lines[0].startswith("# ")
    first_block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert first_block and text.index("```") == first_block.start()  # the first code block of the page
    assert not text[len(lines[0]):first_block.start()].strip(), "nothing between the title and the commands"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["bash examples/quickstart.sh", "bash scripts/run_tests.sh"]
    for script in ("examples/quickstart.sh", "scripts/run_tests.sh"):
        body = open(os.path.join(ROOT, script)).read()
        assert 'bash "$root/scripts/setup_env.sh"' in body or 'bash "$here/setup_env.sh"' in body, script
    ci = [line for line in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == "exec bash scripts/run_tests.sh" and all(
        line.startswith(("set ", "cd ")) for line in ci[:-1]), ci
    # torch pinned and installed before deepspeed (which builds against it).
    setup = open(os.path.join(ROOT, "scripts", "setup_env.sh")).read()
    assert setup.index("install torch==2.13.0") < setup.index("-r \"$root/requirements.txt\"")
    assert "deepspeed==" in open(os.path.join(ROOT, "requirements.txt")).read()


RECIPES = {  # script: (preset, layers, learning rates of the three phases)
    "enwik8_12l.sh": ("enwik8-12l", 12, [2.5e-4, 1.25e-4, 6.25e-5]),
    "enwik8_30l.sh": ("enwik8-30l", 30, [2.5e-4, 1.25e-4, 6.25e-5]),
    "text8_12l.sh": ("text8-12l", 12, [5e-4, 2.5e-4, 1.25e-4]),
}
V100_RECIPES = {"enwik8_30l.sh"}  # written for 8 x V100 32 GB (sm_70): fp16, the blocked core


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_recipe_phases_parse_with_their_deepspeed_json(script, tmp_path, monkeypatch):
    """Each recipe, launched through a recorder instead of `deepspeed`: three phases of 2048 / 4096 / 8192 tokens,
    memory = segment, lr halved each phase, phases 2 and 3 --finetune from the previous one; the flags and the
    recipe's DeepSpeed JSON agree (a contradiction would be an error at start) on an 8-GPU layout. The V100 recipe is
    read on a faked V100: fp16 with dynamic loss scaling, `auto` = blocked, and each phase's memory estimate fits
    32 GB with the start-up check's headroom."""
    v100 = script in V100_RECIPES
    if v100:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
        monkeypatch.setattr(arguments, "_cuda", lambda: True)
    record = tmp_path / "calls"
    recorder = tmp_path / "launch.sh"
    recorder.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> "{record}"\nprintf "\\n\\0" >> "{record}"\n')
    out = tmp_path / "runs"
    env = dict(os.environ, LAUNCH=f"bash {recorder}", OUT=str(out), DATA=str(tmp_path / "data"))
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", script)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    calls = [c.strip("\0").split("\0") for c in record.read_text().split("\n\0") if c.strip("\0")]
    assert len(calls) == 3
    preset, layers, lrs = RECIPES[script]
    for phase, argv in enumerate(calls):
        assert argv[0].endswith("pretrain_char_lm.py")
        args = finalize_args(parse_args(argv[1:]), world_size=8)
        cfg = build_ds_config(args, on_cpu=False)
        assert args.preset == preset and args.model["num_layers"] == layers
        assert args.seq_length == args.model["mem_length"] == [2048, 4096, 8192][phase]
        assert args.lr == pytest.approx(lrs[phase])
        assert args.save == str(out / f"phase{phase + 1}")
        if phase == 0:
            assert args.load is None and not args.finetune
        else:
            assert args.finetune and args.load == str(out / f"phase{phase}")
        assert cfg["train_batch_size"] == args.global_batch_size
        assert os.path.exists(args.deepspeed_config)
        if not v100:
            assert cfg["bf16"]["enabled"]
            continue
        assert cfg["fp16"] == {"enabled": True, **FP16_LOSS_SCALING} and not cfg["bf16"]["enabled"]
        config = TransformerLSConfig(**args.model, seq_length=args.seq_length)
        layout = training_layout(args, config, cfg, "cuda")
        assert layout.attention_impl == "blocked" and layout.precision == "fp16"
        assert layout.recompute_attention == (phase == 2) and not layout.checkpoint_activations
        total = estimate_memory(config, args.seq_length, config.mem_length, layout).total
        assert total <= HEADROOM * 32 * GiB, (phase, total / GiB)


def test_hostfile_example_is_deepspeed_syntax():
    hosts = [line.split() for line in open(os.path.join(ROOT, "examples", "hostfile")).read().splitlines()
             if line.strip() and not line.startswith("#")]
    assert hosts and all(len(h) == 2 and re.fullmatch(r"slots=\d+", h[1]) for h in hosts), hosts


def test_long_context_recipe_parses_on_eight_gpus(tmp_path):
    """examples/long_context.sh through a recorder: 256K-token segments split 8 ways, a valid 8-GPU layout."""
    record = tmp_path / "calls"
    recorder = tmp_path / "launch.sh"
    recorder.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "{record}"\n')
    env = dict(os.environ, LAUNCH=f"bash {recorder}", OUT=str(tmp_path / "runs"), DATA=str(tmp_path / "data"))
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "long_context.sh")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    argv = record.read_text().strip("\0").split("\0")[1:]  # drop the script path
    args = finalize_args(parse_args(argv), world_size=8)
    build_ds_config(args, on_cpu=False)
    assert args.seq_length == 262144 and args.model["mem_length"] == 262144
    assert (args.layout.sp, args.layout.dp, args.layout.tp) == (8, 1, 1)
