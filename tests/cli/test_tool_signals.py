"""Ctrl-C and SIGTERM in the tools (preprocess, convert, evaluate, generate): one line, exit 130 / 143, no
temporary file left, no mix of old and new outputs. The signals come at exact points: the test hook
MEGATRON_LS_TEST_SIGNAL=POINT:NAME, or a patched function that signals its own process."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from model_dirs import make_model_dir
from repo_paths import REPO_ROOT as ROOT

from megatron_ls.checkpoint.consolidated import load_consolidated
from megatron_ls.checkpoint.writer import _recover_old
from megatron_ls.cli import evaluate as evaluate_cli
from megatron_ls.cli.convert_checkpoint import main as convert_main
from megatron_ls.cli.preprocess_data import main as preprocess_main
from megatron_ls.cli.runner import run_cli
from megatron_ls.data.tokenizers import _train_here, train_sentencepiece
from megatron_ls.tool_signals import TEST_SIGNAL_ENV, Terminated, sigterm_raises, uninterruptible

TOOLS = os.path.join(ROOT, "tools")
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n" for i in range(3000))


def tool_cmd(name: str, *argv: str, hook: str | None = None, patch: str | None = None) -> tuple[list[str], dict]:
    """The command and environment of tools/NAME.py; `hook` sets the test signal hook, `patch` is Python run
    before the tool's main."""
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    env.pop(TEST_SIGNAL_ENV, None)
    if hook:
        env[TEST_SIGNAL_ENV] = hook
    path = os.path.join(TOOLS, f"{name}.py")
    if not patch:
        return [sys.executable, path, *argv], env
    return [sys.executable, "-c", f"import os, runpy, signal, sys\n{patch}\nsys.argv = sys.argv[1:]\n"
            f"runpy.run_path({path!r}, run_name='__main__')", path, *argv], env


def sigterm_in(owner: str, attr: str, call_first: bool = False) -> str:
    """A `patch`: OWNER.ATTR (OWNER imported by `from ... import`) sends SIGTERM to its process, after calling
    the original when `call_first`."""
    module, _, name = owner.rpartition(".")
    return (f"from {module} import {name} as _owner\n_orig = _owner.{attr}\n"
            f"def _stand_in(*a, **k):\n    {'_orig(*a, **k)' if call_first else 'pass'}\n"
            f"    os.kill(os.getpid(), signal.SIGTERM)\n    raise AssertionError('SIGTERM did not stop it')\n"
            f"_owner.{attr} = _stand_in")


def tool(name: str, *argv: str, hook: str | None = None, patch: str | None = None) -> subprocess.CompletedProcess:
    cmd, env = tool_cmd(name, *argv, hook=hook, patch=patch)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def one_line(res: subprocess.CompletedProcess, rc: int, line: str) -> None:
    assert res.returncode == rc, res.stderr
    assert res.stderr.strip().splitlines() == [line], res.stderr


def temps(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".tmp" in n or n.startswith("tmp") or ".old" in n
                  or n.endswith(".partial"))


# ---- the shared pieces -----------------------------------------------------------------------
@pytest.mark.parametrize("exc,rc,word", [(KeyboardInterrupt, 130, "interrupted"), (Terminated, 143, "terminated")])
def test_run_cli_says_one_line_on_a_signal(capsys, exc, rc, word):
    def body():
        raise exc

    try:
        status = run_cli(body, "tool.py")
    except BaseException as e:  # noqa: B036 - a KeyboardInterrupt let through would stop the whole pytest run
        pytest.fail(f"run_cli let {type(e).__name__} through")
    assert status == rc
    assert capsys.readouterr().err == f"tool.py: {word}\n"


def test_sigterm_raises_terminated_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_raises():
        handler = signal.getsignal(signal.SIGTERM)
        with pytest.raises(Terminated):  # called directly: a real SIGTERM would end pytest if it did not raise
            handler(signal.SIGTERM, None)
    assert signal.getsignal(signal.SIGTERM) == before


def _raise_terminated(signum, frame):
    raise Terminated


@pytest.mark.parametrize("sig,exc", [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_uninterruptible_delivers_the_signal_after_the_block(sig, exc):
    before = signal.signal(signal.SIGTERM, _raise_terminated)  # not the default, which would end pytest
    try:
        handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        done = []
        with pytest.raises(exc) as info:
            with uninterruptible():
                os.kill(os.getpid(), sig)
                time.sleep(0.05)
                done.append(1)  # reached: the signal waited
        assert done == [1] and info.value.published is True
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    finally:
        signal.signal(signal.SIGTERM, before)


def test_uninterruptible_keeps_a_signal_that_another_thread_could_take():
    """A process-directed SIGTERM while other threads run (numpy's OpenBLAS workers in the tools): it must
    still reach the block's end, every time (it once went to another thread and was lost)."""
    before = signal.signal(signal.SIGTERM, _raise_terminated)
    stop = threading.Event()
    others = [threading.Thread(target=stop.wait, daemon=True) for _ in range(4)]
    for t in others:
        t.start()
    try:
        for _ in range(200):
            with pytest.raises(Terminated) as info:
                with uninterruptible():
                    os.kill(os.getpid(), signal.SIGTERM)
            assert info.value.published is True
    finally:
        stop.set()
        signal.signal(signal.SIGTERM, before)


# ---- convert ---------------------------------------------------------------------------------
@pytest.fixture()
def models(tmp_path):
    return make_model_dir(str(tmp_path / "m256")), make_model_dir(str(tmp_path / "m27"), vocab=27)


def test_convert_sigterm_between_the_renames_publishes_the_whole_new_checkpoint(models, tmp_path):
    m256, m27 = models
    ck, out = str(tmp_path / "ck"), str(tmp_path / "out")
    assert convert_main(["--load", m256, "--output", ck, "--target-tp", "1"]) == 0
    assert convert_main(["--load", ck, "--output", out]) == 0  # the old output: vocabulary 256
    assert convert_main(["--load", m27, "--output", ck, "--target-tp", "1", "--overwrite"]) == 0
    res = tool("convert_checkpoint", "--load", ck, "--output", out, "--overwrite", hook="publish:TERM")
    one_line(res, 143, "convert_checkpoint.py: terminated (after its output was written in full)")
    model, tok = load_consolidated(out)  # config, weights and tokenizer all of the new model
    assert model.config.vocab_size == 27 and tok.vocab_size == 27
    assert temps(out) == []


def test_convert_sigint_in_the_training_layout_publish(models, tmp_path):
    m256, m27 = models
    ck = str(tmp_path / "ck")
    assert convert_main(["--load", m256, "--output", ck, "--target-tp", "1"]) == 0
    res = tool("convert_checkpoint", "--load", m27, "--output", ck, "--target-tp", "2", "--overwrite",
               hook="publish:INT")
    one_line(res, 130, "convert_checkpoint.py: interrupted (after its output was written in full)")
    assert open(os.path.join(ck, "latest")).read().strip() == "iter_0000000"
    tag = os.path.join(ck, "iter_0000000")
    assert json.load(open(os.path.join(tag, "run_state.json")))["model"]["vocab_size"] == 27
    assert os.path.isfile(os.path.join(tag, "mp_rank_01_model_states.pt")) and temps(ck) == []


def test_convert_sigterm_while_writing_removes_the_temporary_files(models, tmp_path):
    m256, _ = models
    out = str(tmp_path / "out")
    patch = sigterm_in("safetensors.torch", "save_file", call_first=True)
    ck = str(tmp_path / "ck")
    assert convert_main(["--load", m256, "--output", ck, "--target-tp", "1"]) == 0
    res = tool("convert_checkpoint", "--load", ck, "--output", out, patch=patch)
    one_line(res, 143, "convert_checkpoint.py: terminated")
    assert os.listdir(out) == []  # not even model.safetensors.tmp<pid>


def test_convert_recovers_a_tag_that_a_killed_publish_left_as_old(models, tmp_path):
    m256, m27 = models
    ck = str(tmp_path / "ck")
    assert convert_main(["--load", m256, "--output", ck, "--target-tp", "1"]) == 0
    tag = os.path.join(ck, "iter_0000000")
    os.rename(tag, tag + ".old4242")  # killed between TAG -> TAG.old and TAG.partial -> TAG
    _recover_old(tag)
    assert sorted(os.listdir(ck)) == ["iter_0000000", "latest"]
    os.mkdir(tag + ".old4243")  # a leftover beside a published TAG is removed by the next conversion
    assert convert_main(["--load", m27, "--output", ck, "--target-tp", "1", "--overwrite"]) == 0
    assert sorted(os.listdir(ck)) == ["iter_0000000", "latest"]


# ---- evaluate / generate ---------------------------------------------------------------------
@pytest.fixture()
def shards(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT)
    prefix = str(tmp_path / "b" / "b")
    assert preprocess_main(["--dataset", "text", "--input", str(tmp_path / "t.txt"), "--output-prefix", prefix,
                            "--no-progress"]) == 0
    capsys.readouterr()
    return prefix


def _evaluate_args(model, prefix, output):
    return ["--model", model, "--data-path", prefix, "--context", "64", "--step", "16", "--max-tokens", "40",
            "--output", output, "--no-progress"]


def test_evaluate_output_failure_keeps_the_old_file(models, shards, tmp_path, monkeypatch, capsys):
    output = tmp_path / "ev.json"
    output.write_text('{"old": true}\n')

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate_cli.json, "dump", disk_full)
    assert evaluate_cli.main(_evaluate_args(models[0], shards, str(output))) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert output.read_text() == '{"old": true}\n' and os.listdir(tmp_path / "b") and temps(tmp_path) == []


def test_evaluate_sigterm_before_the_output_is_replaced(models, shards, tmp_path):
    output = tmp_path / "ev.json"
    output.write_text('{"old": true}\n')
    res = tool("evaluate", *_evaluate_args(models[0], shards, str(output)), hook="evaluate_output:TERM")
    assert res.returncode == 143 and res.stderr.strip().splitlines()[-1] == "evaluate.py: terminated", res.stderr
    assert "Traceback" not in res.stderr
    assert output.read_text() == '{"old": true}\n' and temps(tmp_path) == []


def test_generate_sigterm_is_one_line(models):
    patch = sigterm_in("megatron_ls.inference.generate", "generate")
    res = tool("generate", "--model", models[0], "--prompt", "ab", patch=patch)
    one_line(res, 143, "generate.py: terminated")


# ---- preprocess ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,rc,word", [("INT", 130, "interrupted"), ("TERM", 143, "terminated")])
def test_preprocess_signal_between_the_renames_publishes_the_whole_new_set(shards, tmp_path, name, rc, word):
    (tmp_path / "short.txt").write_text(TEXT[:20000])
    res = tool("preprocess_data", "--dataset", "text", "--input", str(tmp_path / "short.txt"), "--output-prefix",
               shards, "--no-progress", "--overwrite", hook=f"publish:{name}")
    one_line(res, rc, f"preprocess_data: {word} (after its output was written in full)")
    meta = json.load(open(shards + ".json"))
    assert meta["source"]["bytes"] == 20000
    for split in ("train", "valid", "test"):
        assert os.path.getsize(f"{shards}_{split}.bin") == meta["splits"][split]["tokens"]
    assert temps(os.path.dirname(shards)) == []


def test_preprocess_sigterm_while_encoding_leaves_no_scratch_files(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    prefix = str(tmp_path / "sp" / "sp")
    args = ["--dataset", "text", "--input", str(tmp_path / "t.txt"), "--output-prefix", prefix,
            "--tokenizer", "sentencepiece", "--vocab-size", "300", "--no-progress"]
    assert tool("preprocess_data", *args).returncode == 0
    before = {n: open(os.path.join(tmp_path, "sp", n), "rb").read() for n in os.listdir(tmp_path / "sp")}
    patch = sigterm_in("megatron_ls.data.tokenizers.SentencePieceTokenizer", "encode_many")
    res = tool("preprocess_data", *args, "--overwrite", patch=patch)
    one_line(res, 143, "preprocess_data: terminated; nothing was written")
    after = {n: open(os.path.join(tmp_path, "sp", n), "rb").read() for n in os.listdir(tmp_path / "sp")}
    assert after == before  # old outputs intact; no tmpXXXX folder, no *.tmp<pid> file


def test_preprocess_ctrl_c_stops_the_sentencepiece_training_at_once(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    # The hook makes the training child signal this process and then sleep 60 s: only killing it ends soon.
    cmd, env = tool_cmd("preprocess_data", "--dataset", "text", "--input", str(tmp_path / "t.txt"),
                        "--output-prefix", str(tmp_path / "sp" / "sp"), "--tokenizer", "sentencepiece",
                        "--vocab-size", "300", "--no-progress", hook="sp_train:INT")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    one_line(subprocess.CompletedProcess(cmd, proc.returncode, out, err), 130,
             "preprocess_data: interrupted; nothing was written")
    assert sorted(os.listdir(tmp_path)) == ["t.txt"]
    deadline = time.monotonic() + 10  # the training child is killed, not orphaned: its session empties
    while _session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _session(proc.pid) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child dies with its parent on Linux only")
def test_preprocess_sigkill_during_the_sentencepiece_training_leaves_no_orphan(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT)
    prefix = str(tmp_path / "sp" / "sp")
    # The hook makes the training child SIGKILL this process (no cleanup possible) and then sleep 60 s.
    cmd, env = tool_cmd("preprocess_data", "--dataset", "text", "--input", str(tmp_path / "t.txt"),
                        "--output-prefix", prefix, "--tokenizer", "sentencepiece", "--vocab-size", "300",
                        "--no-progress", hook="sp_train:KILL")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # no pipes: an orphan would hold them open
    try:
        assert proc.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 5  # the orphaned child is killed too: the session empties
        while _session(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _session(proc.pid) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    # What it left is named for this host and its pid; the next run writing there removes it.
    left = temps(tmp_path / "sp")
    assert left and all(f"-{proc.pid}" in n for n in left), left
    assert preprocess_main(["--dataset", "text", "--input", str(tmp_path / "t.txt"), "--output-prefix", prefix,
                            "--no-progress"]) == 0
    assert "left by killed runs" in capsys.readouterr().err
    assert temps(tmp_path / "sp") == []


def _session(sid: int) -> list[str]:
    """The processes of session SID (their /proc/PID/stat lines)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[3]) == sid:  # state ppid pgrp session ...
            found.append(stat)
    return found


def test_sentencepiece_model_of_the_child_is_the_in_process_one(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    prefix = str(tmp_path / "m")  # the model records its prefix: the same one for both
    _train_here([str(tmp_path / "t.txt")], prefix, 300, "unigram", 1, 2_000_000)
    here = open(prefix + ".model", "rb").read()
    os.remove(prefix + ".model")
    assert open(train_sentencepiece([str(tmp_path / "t.txt")], prefix, 300), "rb").read() == here


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig,rc,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_while_loading_is_one_line(sig, rc, word):
    """What the entry scripts wrap their heavy imports in (torch, DeepSpeed: seconds before main())."""
    code = ("import os, signal, time\n"
            "from megatron_ls.tool_signals import stopping_while_loading\n"
            "with stopping_while_loading('x.py'):\n"
            f"    os.kill(os.getpid(), {int(sig)})\n"
            "    time.sleep(30)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == rc and p.stderr.splitlines() == [f"x.py: {word} while starting"], p.stderr[-2000:]


def test_a_signal_while_loading_ends_the_process_even_where_the_import_catches_everything():
    """An import that catches BaseException (a probe for an optional dependency) cannot swallow the stop and go
    on half-imported (once: numpy without may_share_memory, then a traceback in the data loading)."""
    code = ("import os, signal, time\n"
            "from megatron_ls.tool_signals import stopping_while_loading\n"
            "with stopping_while_loading('x.py'):\n"
            "    try:\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(30)\n"
            "    except BaseException:\n"
            "        pass\n"
            "print('went on')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 143 and p.stdout == "", p.stdout
    assert p.stderr.splitlines() == ["x.py: terminated while starting"], p.stderr[-2000:]


@pytest.mark.timeout(120)
def test_ctrl_c_while_convert_imports_torch():
    cmd, env = tool_cmd("convert_checkpoint", "--help")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    time.sleep(0.15)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.splitlines() == ["convert_checkpoint.py: interrupted while starting"], err[-2000:]
