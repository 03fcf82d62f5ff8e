"""Training building blocks that need no model or processes: arguments, DeepSpeed JSON, schedules,
logging, checkpoint files, signals."""

from __future__ import annotations

import json
import math
import os
import re
import signal

import pytest
import torch
from distributed import run_distributed

from megatron_ls.checkpoint import files
from megatron_ls.errors import CheckpointError, ConfigError
from megatron_ls.training import checkpointing as ckpt
from megatron_ls.training.arguments import finalize_args, parse_args
from megatron_ls.training.ds_config import build_ds_config
from megatron_ls.training.logging import TrainingLogger, truncate_metrics
from megatron_ls.training.schedules import scheduler_config, start_at_first_update
from megatron_ls.training.signals import StopSignals

BASE = ["--data-path", "d/p", "--seq-length", "64", "--train-iters", "10", "--num-layers", "2", "--hidden-size",
        "32", "--num-attention-heads", "2", "--window-size", "16", "--chunk-size", "8"]


def args_of(*extra: str, world: int = 1):
    return finalize_args(parse_args(BASE + list(extra)), world_size=world)


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


# ---- schedules: DeepSpeed's scheduler classes built from our JSON ------------------------------
def _lrs(style, lr, min_lr, warmup, total):
    from deepspeed.runtime import lr_schedules

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    spec = scheduler_config(style, lr, min_lr, warmup, total)
    sched = getattr(lr_schedules, spec["type"])(opt, **spec["params"])
    start_at_first_update(sched)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules():
    # Update k of W warm-up updates runs at lr * k / W: none at lr 0, full lr at update W.
    c = _lrs("constant", 1e-3, 0.0, 10, 30)
    assert c[:10] == pytest.approx([1e-3 * k / 10 for k in range(1, 11)]) and all(x == 1e-3 for x in c[10:])
    assert all(x == 1e-3 for x in _lrs("constant", 1e-3, 0.0, 0, 10))
    assert all(x == 1e-3 for x in _lrs("constant", 1e-3, 0.0, 1, 10))
    lin = _lrs("linear", 1e-3, 1e-4, 5, 50)
    assert lin[0] == pytest.approx(1e-4 + 9e-4 / 5) and lin[4] == pytest.approx(1e-3)
    assert lin[-1] == pytest.approx(1e-4) and lin[20] > lin[40]
    cos = _lrs("cosine", 1e-3, 1e-4, 5, 50)
    assert cos[0] == pytest.approx(2e-4) and max(cos) == pytest.approx(1e-3, rel=0.01)
    assert cos[-1] == pytest.approx(1e-4) and cos[20] > cos[40]


# ---- logging --------------------------------------------------------------------------------
def test_logger_writes_metrics_and_truncates_on_resume(tmp_path, capsys):
    log = TrainingLogger(rank=0, train_iters=4, save_dir=str(tmp_path), tensorboard_dir=str(tmp_path / "tb"))
    for it in range(1, 5):
        log.log_train(it, 2.0 - 0.1 * it, 1e-3, 0.5, 1000, 0.1)
    log.log_eval(4, 1.5, 100, 0.2)
    log.close()
    line = capsys.readouterr().out.splitlines()[0]
    # Each field with its value: iteration, loss (nats), bpc, lr, grad norm, tokens/s (1000 tokens in 0.1 s), times.
    fields = dict(part.strip().rsplit(" ", 1) for part in line.split("|"))
    assert fields["iteration"] == "1/4" and fields["loss"] == "1.9000" and fields["bpc"] == f"{1.9 / math.log(2):.4f}"
    assert float(fields["lr"]) == 1e-3 and fields["grad norm"] == "0.500" and fields["tokens/s"] == "10,000"
    assert fields["elapsed"].count(":") == 2 and fields["ETA"].count(":") == 2
    recs = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["iteration"] for r in recs] == [1, 2, 3, 4, 4]
    assert {"iteration", "lm_loss", "bpc", "lr"} <= set(recs[0])
    assert recs[0]["lm_loss"] == pytest.approx(1.9) and recs[0]["lr"] == 1e-3
    assert recs[0]["bpc"] == pytest.approx(1.9 / math.log(2))
    assert recs[-1]["valid_bpc"] == pytest.approx(1.5 / math.log(2))
    truncate_metrics(str(tmp_path / "metrics.jsonl"), 2)
    assert [json.loads(x)["iteration"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2]
    # TensorBoard: Megatron's names, plus BPC, tokens/s and memory.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm-loss-training", "learning-rate", "grad-norm", "bpc", "tokens-per-second", "memory"} <= tags, tags
    assert [e.step for e in events.Scalars("lm-loss-training")] == [1, 2, 3, 4]
    assert events.Scalars("lm-loss-training")[0].value == pytest.approx(1.9)
    assert events.Scalars("learning-rate")[0].value == pytest.approx(1e-3)
    assert events.Scalars("bpc")[0].value == pytest.approx(1.9 / math.log(2))


def test_logger_is_silent_off_rank0(tmp_path, capsys):
    log = TrainingLogger(rank=1, train_iters=4, save_dir=str(tmp_path), tensorboard_dir=None)
    log.log_train(1, 1.0, 1e-3, 0.5, 1000, 0.1)
    assert capsys.readouterr().out == "" and not os.path.exists(tmp_path / "metrics.jsonl")


# ---- checkpoints (a stand-in for DeepSpeed's file writing) ------------------------------------
class FakeEngine:
    def __init__(self, value: float = 0.0) -> None:
        self.value = value

    def save_checkpoint(self, save_dir, tag, client_state=None, save_latest=True):
        assert not save_latest
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save({"w": torch.tensor([self.value])}, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))

    def load_checkpoint(self, load_dir, tag, load_optimizer_states=True, load_module_only=False):
        self.value = float(torch.load(os.path.join(load_dir, tag, "mp_rank_00_model_states.pt"))["w"][0])
        return load_dir, {}


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
        def load_checkpoint(self, load_dir, tag, load_optimizer_states=True, load_module_only=False):
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
    elif damage == "no-latest":  # and no complete checkpoint either (one left is read: test_run_folder_units.py)
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


# ---- signals --------------------------------------------------------------------------------
def test_stop_signals_record_and_restore():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as s:
        assert not s.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.stop_requested() and s.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_foreign_checkpoint_is_weights_only(tmp_path):
    """A DeepSpeed checkpoint another tool wrote (no manifest, no run state): --finetune may read its weights."""
    d = tmp_path / "ck"
    (d / "global_step5").mkdir(parents=True)
    (d / "latest").write_text("global_step5")
    path, info = ckpt.locate_checkpoint(str(d), weights_only=True)
    assert path.endswith("global_step5") and info == {}
    with pytest.raises(CheckpointError, match="--finetune"):
        ckpt.locate_checkpoint(str(d))


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


# ---- main(): what reaches the user when set-up is cut short ----------------------------------
def test_main_sigterm_during_setup_and_lost_peer(monkeypatch, capsys):
    from megatron_ls.cli import pretrain

    monkeypatch.setattr(pretrain, "train", lambda argv: os.kill(os.getpid(), signal.SIGTERM) or 0)
    assert pretrain.main([]) == 143
    assert "terminated (SIGTERM) outside the training loop" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored

    def lost(argv):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:40579: Connection reset by "
                           "peer. This is typically caused by a remote worker hanging\nmore")

    monkeypatch.setattr(pretrain, "train", lost)
    assert pretrain.main([]) == 1
    err = capsys.readouterr().err
    assert "another rank stopped or lost its connection" in err and "Traceback" not in err

    def bug(argv):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(pretrain, "train", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # a real bug keeps its traceback
        pretrain.main([])
