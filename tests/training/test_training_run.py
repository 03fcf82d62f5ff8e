"""pretrain_char_lm.py end to end in one process: exact resume, a crash inside a save, SIGTERM, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from training_utils import ROOT, SCRIPT, TINY, env, error_lines, make_shards, metrics, run, train_losses

pytestmark = pytest.mark.slow
ITERS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_shards(str(tmp_path_factory.mktemp("data") / "pydoc"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> str:
    """An uninterrupted run of ITERS steps."""
    save = str(tmp_path_factory.mktemp("reference"))
    r = run(["--data-path", data, *TINY, "--train-iters", str(ITERS), "--save", save])
    assert r.returncode == 0, r.stderr[-3000:]
    return save


def _losses_and_evals(save: str) -> list[tuple]:
    return [(r["iteration"], r.get("lm_loss"), r.get("lr"), r.get("valid_loss")) for r in metrics(save)]


@pytest.mark.timeout(300)
def test_exact_resume_is_bitwise(data, reference, tmp_path):
    save = str(tmp_path / "ck")
    first = run(["--data-path", data, *TINY, "--train-iters", str(ITERS), "--save", save,
                 "--exit-interval", str(ITERS // 2)])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "--exit-interval 4: stopped at iteration 4" in first.stdout
    second = run(["--data-path", data, *TINY, "--train-iters", str(ITERS), "--save", save, "--load", save])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "iter_0000004" in second.stdout
    ref = _losses_and_evals(reference)
    assert len(train_losses(reference)) == ITERS
    assert _losses_and_evals(save) == ref  # floats from JSON: bitwise equality of every loss
    losses = [loss for _, loss in train_losses(reference)]
    assert losses[-1] < losses[0]
    # --lr 3e-3 warmed up over 2 updates: the first update already moves (no update at lr 0).
    lrs = [r["lr"] for r in metrics(reference) if "lm_loss" in r]
    assert lrs == pytest.approx([1.5e-3] + [3e-3] * (ITERS - 1))


@pytest.mark.timeout(300)
def test_selective_recompute_changes_nothing_but_memory(data, tmp_path):
    """Rebuilding the attention scores in the backward (attention dropout on) gives bitwise the same run."""
    losses = []
    for extra in ([], ["--recompute-granularity", "selective"]):
        save = str(tmp_path / f"ck{len(extra)}")
        r = run(["--data-path", data, *TINY, "--train-iters", "4", "--attention-dropout", "0.1", "--save", save,
                 *extra])
        assert r.returncode == 0, r.stderr[-3000:]
        losses.append(_losses_and_evals(save))
    assert "recompute selective" in r.stdout
    assert losses[0] == losses[1]


@pytest.mark.timeout(300)
def test_sigkill_inside_save_resumes_from_last_complete(data, reference, tmp_path):
    save = str(tmp_path / "ck")
    crashed = run(["--data-path", data, *TINY, "--train-iters", str(ITERS), "--save", save, "--save-interval", "3"],
                  extra_env={"MEGATRON_LS_TEST_CRASH_IN_SAVE": "6"})
    assert crashed.returncode == -signal.SIGKILL
    assert open(os.path.join(save, "latest")).read().strip() == "iter_0000003"
    assert os.path.isdir(os.path.join(save, "iter_0000006.partial"))  # the interrupted save, never loaded
    resumed = run(["--data-path", data, *TINY, "--train-iters", str(ITERS), "--save", save, "--load", save,
                   "--save-interval", "3"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "iter_0000003" in resumed.stdout
    assert _losses_and_evals(save) == _losses_and_evals(reference)  # steps 4..6 redone identically
    assert not os.path.exists(os.path.join(save, "iter_0000006.partial"))
    assert open(os.path.join(save, "latest")).read().strip() == f"iter_{ITERS:07d}"


@pytest.mark.timeout(300)
def test_sigterm_saves_and_exits_zero(data, tmp_path):
    save = str(tmp_path / "ck")
    proc = subprocess.Popen([sys.executable, SCRIPT, "--data-path", data, *TINY, "--train-iters", "100000",
                             "--save", save, "--eval-interval", "0", "--eval-iters", "0"],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        path = os.path.join(save, "metrics.jsonl")
        while not (os.path.exists(path) and len(open(path).readlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    tag = open(os.path.join(save, "latest")).read().strip()
    it = int(tag.split("_")[1])
    assert f"received SIGTERM: stopped at iteration {it} after saving {tag}" in out
    assert json.load(open(os.path.join(save, tag, "run_state.json")))["iteration"] == it


@pytest.mark.timeout(300)
@pytest.mark.parametrize("delay", [0.3, 1.0])
def test_sigterm_while_starting_is_one_line(data, delay):
    """Before the training loop (torch / DeepSpeed imports, model build) there is nothing to save: one line, 143."""
    proc = subprocess.Popen([sys.executable, SCRIPT, "--data-path", data, *TINY, "--train-iters", "100000",
                             "--eval-iters", "0"], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert "terminated" in line


@pytest.mark.timeout(300)
def test_sigterm_during_the_final_evaluation_saves_and_exits_zero(data, tmp_path):
    save = str(tmp_path / "ck")
    r = run(["--data-path", data, *TINY, "--train-iters", "2", "--eval-interval", "0", "--eval-iters", "-1",
             "--save", save], extra_env={"MEGATRON_LS_TEST_SIGNAL": "training_eval:TERM"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "received SIGTERM at the end of training: stopped at iteration 2 after saving iter_0000002" in r.stdout
    assert open(os.path.join(save, "latest")).read().strip() == "iter_0000002"
    assert not any("valid_loss" in m for m in metrics(save))  # the interrupted evaluation is not reported


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["no-data-path", "vocab", "chunk", "missing-ckpt", "ds-json", "save-is-file",
                                  "save-holds-a-checkpoint", "beyond-train-iters", "token-ids", "tokenizer",
                                  "other-data"])
def test_bad_inputs_one_clear_message(data, reference, tmp_path, case):
    args = ["--data-path", data, *TINY, "--train-iters", "2"]
    if case == "no-data-path":
        args, want = args[2:], "--data-path is required"
    elif case == "vocab":  # text8's 27-symbol model on byte-level shards
        args, want = args + ["--vocab-size", "27"], "have a vocabulary of 256 (byte tokenizer"
    elif case == "chunk":
        args, want = args + ["--seq-length", "36"], "--seq-length (36) must be a multiple of --chunk-size (8)"
    elif case == "missing-ckpt":
        args, want = args + ["--load", str(tmp_path / "nothing")], "checkpoint directory not found"
    elif case == "ds-json":
        cfg = tmp_path / "ds.json"
        cfg.write_text(json.dumps({"train_batch_size": 64, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}))
        args, want = args + ["--deepspeed_config", str(cfg)], "--global-batch-size 4 contradicts train_batch_size = 64"
    elif case == "save-is-file":
        (tmp_path / "f").write_text("x")
        args, want = args + ["--save", str(tmp_path / "f")], "it is a file, not a folder"
    elif case == "save-holds-a-checkpoint":  # another run's checkpoint, not resumed: refused, left as it was
        before = sorted(os.listdir(reference))
        args, want = args + ["--save", reference], "already holds a checkpoint (iter_0000008) that this run would"
    elif case == "beyond-train-iters":
        args, want = args + ["--load", reference], "is at iteration 8, beyond --train-iters 2"
    else:  # shards whose metadata says another vocabulary size / another tokenizer of the same size
        for name in os.listdir(os.path.dirname(data)):
            shutil.copy(os.path.join(os.path.dirname(data), name), tmp_path / name)
        prefix = str(tmp_path / os.path.basename(data))
        meta = json.load(open(prefix + ".json"))
        if case == "token-ids":
            meta["vocab_size"] = 100
            want = "holds token id"
        elif case == "other-data":  # same sizes, other bytes
            train = tmp_path / (os.path.basename(data) + "_train.bin")
            train.write_bytes(train.read_bytes()[::-1])
            args, want = args + ["--load", reference, "--train-iters", "9"], "was trained on other data"
        else:
            meta["tokenizer"] = {"type": "sentencepiece", "vocab_size": 256, "model_sha256": "0" * 64}
            args, want = args + ["--load", reference, "--train-iters", "9"], "was trained on another tokenizer"
        json.dump(meta, open(prefix + ".json", "w"))
        args = ["--data-path", prefix, *args[2:]]
    r = run(args, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and want in lines[0], r.stderr[-3000:]
    if case == "save-holds-a-checkpoint":
        assert sorted(os.listdir(reference)) == before


@pytest.mark.timeout(300)
def test_preset_vocabulary_mismatch(data):
    r = run(["--data-path", data, "--preset", "text8-12l", "--train-iters", "1"], timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = error_lines(r.stderr)
    assert "vocabulary of 256" in line and "model's is 27 (--preset text8-12l)" in line


@pytest.mark.timeout(300)
def test_finetune_loads_weights_only(data, reference, tmp_path):
    """The paper's phase change: longer segments, weights from the previous phase, everything else fresh."""
    save = str(tmp_path / "phase2")
    tiny = [a if a != "32" else "64" for a in TINY]  # window/seq/mem follow; width 32 -> 64 is undone below
    tiny[tiny.index("--hidden-size") + 1] = "32"
    r = run(["--data-path", data, *tiny, "--train-iters", "2", "--load", reference, "--finetune", "--save", save])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded the weights of" in r.stdout and f"iter_{ITERS:07d}" in r.stdout
    assert [it for it, _ in train_losses(save)] == [1, 2]  # a fresh iteration count
    first_fresh = train_losses(reference)[0][1]
    assert train_losses(save)[0][1] < first_fresh  # starts from the trained weights, not from scratch


@pytest.mark.timeout(300)
def test_nonfinite_loss_skips_and_stops(data, tmp_path):
    """An absurd learning rate makes the loss NaN from step 2: each update is skipped, then a clear stop."""
    save = str(tmp_path / "ck")
    r = run(["--data-path", data, *TINY, "--train-iters", "50", "--lr", "1e30", "--lr-warmup-iters", "0",
             "--max-nonfinite-steps", "3", "--eval-iters", "0", "--save", save])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    (line,) = error_lines(r.stderr)
    assert "for 3 steps in a row" in line and "every update was skipped" in line
    recs = metrics(save)
    assert recs[-1]["skipped"] == 1 and recs[-1]["lm_loss"] is None
    assert not os.path.exists(os.path.join(save, "latest"))  # a broken state is not saved


@pytest.mark.timeout(300)
def test_resume_with_another_micro_batch_size_is_one_clear_error(data, reference):
    """The memory cache is kept per micro-batch: a resume that splits the lanes differently cannot use it."""
    r = run(["--data-path", data, *TINY, "--train-iters", str(ITERS + 1), "--load", reference,
             "--micro-batch-size", "1"], timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    (line,) = error_lines(r.stderr)
    assert "memory cache does not fit this run" in line and "--micro-batch-size" in line
