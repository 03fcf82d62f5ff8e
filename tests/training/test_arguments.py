"""training/arguments.py: the flags, their defaults and the refusals of bad combinations."""

from __future__ import annotations

import pytest
from run_args import BASE, args_of

from megatron_ls.errors import ConfigError
from megatron_ls.training.arguments import finalize_args, parse_args


# ---- arguments ------------------------------------------------------------------------------
def test_defaults_and_memory_follows_seq_length():
    a = args_of()
    assert a.model["mem_length"] == 64 and a.model["ffn_hidden_size"] == 128 and a.data_parallel_size == 1


def test_preset_with_explicit_override():
    a = finalize_args(parse_args(["--data-path", "x", "--train-iters", "1", "--preset", "enwik8-12l",
                                  "--seq-length", "4096", "--dropout", "0.1"]), world_size=1)
    assert a.model["num_layers"] == 12 and a.model["hidden_size"] == 512 and a.model["dropout"] == 0.1
    assert a.seq_length == 4096 and a.model["mem_length"] == 4096  # memory = segment, the paper's phases
    a = finalize_args(parse_args(["--data-path", "x", "--train-iters", "1", "--preset", "enwik8-30l"]), world_size=1)
    assert a.seq_length == 2048 and a.model["num_layers"] == 30 and a.model["dropout"] == 0.4


@pytest.mark.parametrize("argv,match", [
    (["--train-iters", "1", "--seq-length", "64"], "--data-path is required"),
    (["--data-path", "x", "--train-iters", "1"], "--seq-length is required"),
    (BASE + ["--seq-length", "60"], r"--seq-length \(60\) must be a multiple of --chunk-size \(8\)"),
    (BASE + ["--mem-length", "12"], r"--mem-length \(12\)"),
    (BASE + ["--window-size", "4"], r"--window-size \(4\) must be >= --chunk-size"),
    (BASE + ["--num-attention-heads", "3"], "must divide --hidden-size"),
    (BASE + ["--finetune"], "--finetune needs --load"),
    (BASE + ["--save-interval", "5"], "--save-interval needs --save"),
    (BASE + ["--checkpoint-activations", "--recompute-granularity", "selective"], "contradict each other"),
])
def test_bad_arguments(argv, match):
    with pytest.raises(ConfigError, match=match):
        finalize_args(parse_args(argv), world_size=1)


def test_model_arguments_are_checked_by_the_config_itself():
    """finalize_args lets TransformerLSConfig.validate speak, in flag names (here a rule it did not repeat)."""
    with pytest.raises(ConfigError, match=r"--hidden-size / --num-attention-heads must be even .*--attention-type"):
        args_of("--attention-type", "full", "--num-attention-heads", "32")
    with pytest.raises(ConfigError, match=r"--vocab-size must be a positive integer, got 0"):
        args_of("--vocab-size", "0")


def test_world_size_from_the_launcher_environment(monkeypatch):
    for k in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # mpirun's name: distributed.world_from_env reads it too
    assert finalize_args(parse_args(BASE)).world_size == 2


def test_parallel_layout_checks():
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        args_of("--tensor-model-parallel-size", "2", world=3)
    with pytest.raises(ConfigError, match="exceeds --num-layers"):
        args_of("--pipeline-model-parallel-size", "4", world=4)
    assert args_of("--tensor-model-parallel-size", "2", world=4).data_parallel_size == 2


def test_unknown_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(BASE + ["--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-such-flag" in err[0]


def test_help_shows_real_defaults_once():
    from megatron_ls.training.arguments import build_parser

    parser = build_parser()
    text = " ".join(parser.format_help().split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: False)" not in text
    formatter = parser._get_formatter()
    shown = {a.option_strings[0]: formatter._expand_help(a) for a in parser._actions
             if a.option_strings and a.help not in (None, "==SUPPRESS==")}
    assert all(h.count("(default:") <= 1 for h in shown.values()), shown
    for flag, value in (("--lr", "0.00025"), ("--seed", "1234"), ("--num-layers", "12"), ("--zero-stage", "0"),
                        ("--max-nonfinite-steps", "5"), ("--clip-grad", "1.0"), ("--micro-batch-size", "1"),
                        ("--tensor-model-parallel-size", "1"), ("--mem-length", "--seq-length")):
        assert f"(default: {value})" in shown[flag], (flag, shown[flag])
