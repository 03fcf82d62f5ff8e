"""Temporary files named for host and process, and what the next run removes of those a killed run left."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from model_dirs import make_model_dir

from megatron_ls.cli.convert_checkpoint import main as convert_main
from megatron_ls.cli.evaluate import write_result
from megatron_ls.cli.preprocess_data import main as preprocess_main
from megatron_ls.temp_files import host_name, leftover_pid, sweep, temp_dir, temp_name

LINE = "left by killed runs"


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


@pytest.fixture()
def live_pid():
    """The pid of a process that runs for the test's duration (not this one: its own temporary names are reused)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def left(path: str, pid: int, host: str | None = None) -> str:
    """A temporary file of PATH as process PID of HOST (this one by default) would have left it."""
    name = f"{path}.tmp-{host or host_name()}-{pid}"
    with open(name, "w") as f:
        f.write("partial")
    return name


def test_temp_name_holds_host_and_pid_and_parses_back(tmp_path):
    path = str(tmp_path / "x.bin")
    name = os.path.basename(temp_name(path))
    assert name == f"x.bin.tmp-{host_name()}-{os.getpid()}"
    assert leftover_pid(name, "x.bin", host_name()) == os.getpid()
    assert leftover_pid(name, "x.bi", host_name()) is None and leftover_pid(name, "x.bin", "other") is None
    assert leftover_pid(name + ".ab_c9", "x.bin", host_name()) == os.getpid()  # a folder of temp_dir
    assert leftover_pid(f"x.bin.tmp-{host_name()}-5-7", "x.bin", host_name()) is None  # host "<this>-5", pid 7
    with temp_dir(path) as d:
        assert os.path.dirname(d) == str(tmp_path)
        assert leftover_pid(os.path.basename(d), "x.bin", host_name()) == os.getpid()


def test_sweep_removes_only_what_dead_processes_of_this_host_left(tmp_path, capsys):
    path = str(tmp_path / "out.json")
    dead = dead_pid()
    left(path, dead)
    os.mkdir(f"{path}.tmp-{host_name()}-{dead}.abc123")  # a temp_dir folder, with a file in it
    open(f"{path}.tmp-{host_name()}-{dead}.abc123/f", "w").close()
    kept = [left(path, os.getpid()),  # a live process: maybe still writing
            left(path, dead, host="another-host"),  # another machine's run on a shared file system
            left(str(tmp_path / "other.json"), dead)]  # not an output of this run
    assert sweep([path]) == 2
    assert capsys.readouterr().err == f"removed 2 temporary files {LINE}\n"
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in kept)
    assert sweep([path]) == 0
    assert capsys.readouterr().err == ""  # nothing removed: nothing said


def test_preprocess_removes_the_leftovers_of_a_killed_run(tmp_path, capsys, live_pid):
    (tmp_path / "t.txt").write_text("hello world\n" * 200)
    prefix = str(tmp_path / "out" / "p")
    os.mkdir(tmp_path / "out")
    dead = dead_pid()
    gone = [left(prefix + "_train.bin", dead), left(prefix + "_test.idx", dead), left(prefix + ".tokens", dead),
            left(prefix + ".model", dead), left(prefix + ".vocab", dead), left(prefix + ".json", dead)]
    os.mkdir(f"{prefix}.sp.tmp-{host_name()}-{dead}.k3x9q_1a")  # sentencepiece's training folder
    kept = [left(prefix + "_train.bin", live_pid), left(prefix + "_train.bin", dead, host="another-host")]
    assert preprocess_main(["--dataset", "text", "--input", str(tmp_path / "t.txt"), "--output-prefix", prefix,
                            "--no-progress"]) == 0
    assert f"removed {len(gone) + 1} temporary files {LINE}" in capsys.readouterr().err
    names = os.listdir(tmp_path / "out")
    assert not any(os.path.basename(p) in names for p in gone)
    assert all(os.path.basename(p) in names for p in kept)
    assert not any(".sp.tmp-" in n for n in names)


def test_convert_removes_the_leftovers_of_a_killed_run(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    assert convert_main(["--load", make_model_dir(str(tmp_path / "m")), "--output", ck, "--target-tp", "1"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    out.mkdir()
    dead = dead_pid()
    gone = [left(str(out / n), dead) for n in ("model.safetensors", "config.json", "tokenizer.json")]
    kept = left(str(out / "model.safetensors"), dead, host="another-host")
    assert convert_main(["--load", ck, "--output", str(out)]) == 0
    assert f"removed {len(gone)} temporary files {LINE}" in capsys.readouterr().err
    names = os.listdir(out)
    assert os.path.basename(kept) in names and not any(os.path.basename(p) in names for p in gone)


def test_evaluate_output_removes_the_leftover_of_a_killed_run(tmp_path, capsys):
    path = str(tmp_path / "ev.json")
    gone = left(path, dead_pid())
    write_result(path, {"bpc": 1.0})
    assert capsys.readouterr().err == f"removed 1 temporary file {LINE}\n"
    assert sorted(os.listdir(tmp_path)) == ["ev.json"] and not os.path.exists(gone)
