"""The run folder end to end (pretrain_char_lm.py, the real `deepspeed` launcher): a deleted or damaged `latest`,
two runs on one folder, a full disk, SIGTERM to the launcher, extending a finished schedule, which checkpoint the
tools read."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib

import psutil
import pytest
import training_utils as tu

pytestmark = pytest.mark.slow
QUIET = ["--eval-iters", "0", "--log-interval", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return tu.make_shards(str(tmp_path_factory.mktemp("data") / "pydoc"))


def _args(data: str, save: str, iters: int, *extra: str) -> list[str]:
    return ["--data-path", data, *tu.TINY, *QUIET, "--train-iters", str(iters), "--save", save, *extra]


def _crc(path: str) -> int:
    return zlib.crc32(open(path, "rb").read())


def _ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stderr[-3000:]
    return r


# ---- defect 1: `latest` deleted --------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_deleted_latest_neither_loses_checkpoints_nor_stops_a_resume(data, tmp_path):
    save = str(tmp_path / "r")
    _ok(tu.run(_args(data, save, 10, "--save-interval", "5")))
    manifest = os.path.join(save, "iter_0000010", "manifest.json")
    before = _crc(manifest)
    os.remove(os.path.join(save, "latest"))
    r = tu.run(_args(data, save, 10, "--save-interval", "5", "--seed", "8"))  # a new run on the same folder
    assert r.returncode == 1 and tu.error_lines(r.stderr) == [
        f"pretrain_char_lm.py: error: --save {save} already holds 2 complete checkpoints (newest iter_0000010, no "
        f"'latest') that this run would overwrite: to continue that run pass --load {save} (without --finetune); "
        "to start over, delete it or choose another --save folder"], r.stderr
    assert _crc(manifest) == before
    r = _ok(tu.run(_args(data, save, 12, "--load", save)))
    assert f"no 'latest' file in {save}: reading its newest complete checkpoint iter_0000010" in r.stdout
    assert f"resumed from {save}/iter_0000010 at iteration 10" in r.stdout
    assert open(os.path.join(save, "latest")).read().strip() == "iter_0000012"


@pytest.mark.timeout(200)
def test_metrics_of_a_run_without_checkpoints_are_not_overwritten(data, tmp_path):
    save = str(tmp_path / "r")
    _ok(tu.run(["--data-path", data, *tu.TINY, *QUIET, "--train-iters", "3", "--tensorboard-dir", save]))  # no --save
    os.makedirs(save, exist_ok=True)
    with open(os.path.join(save, "metrics.jsonl"), "w") as f:
        f.write('{"iteration": 1, "lm_loss": 5.0}\n')
    r = tu.run(_args(data, save, 3))
    assert r.returncode == 1 and "already holds another run's metrics.jsonl (no checkpoint)" in r.stderr
    assert open(os.path.join(save, "metrics.jsonl")).read() == '{"iteration": 1, "lm_loss": 5.0}\n'


# ---- defect 2: two runs on one folder ----------------------------------------------------------------
@pytest.mark.timeout(300)
def test_a_second_run_is_refused_naming_the_holder(data, tmp_path):
    save = str(tmp_path / "r")
    first = tu.spawn_ranks(_args(data, save, 100000, "--save-interval", "5"), world=1)[0]
    try:
        tu.wait_for_metrics(save, 6, [first])
        second = tu.run(_args(data, save, 100000, "--save-interval", "5", "--load", save))  # even to resume it
        assert second.returncode == 1
        (line,) = tu.error_lines(second.stderr)
        assert line.startswith(f"pretrain_char_lm.py: error: --save {save} is in use by another run (host "
                               f"{os.uname().nodename} pid {first.pid} since "), line
        assert line.endswith("): one run writes a folder at a time; wait for it to end, stop it, or choose another "
                             "--save"), line
    finally:
        first.kill()  # SIGKILL: no cleanup; the kernel drops the lock
        first.communicate()
    tag = open(os.path.join(save, "latest")).read().strip()
    r = _ok(tu.run(_args(data, save, int(tag[5:]) + 1, "--load", save)))
    assert f"resumed from {save}/{tag}" in r.stdout


@pytest.mark.timeout(400)
@pytest.mark.parametrize("gap", [0.0, 0.8])
def test_two_runs_started_together_one_is_refused(data, tmp_path, gap):
    save = str(tmp_path / "r")
    args = _args(data, save, 12, "--save-interval", "4", "--load", save)
    procs = tu.spawn_ranks(args, world=1)
    time.sleep(gap)
    procs += tu.spawn_ranks(args, world=1)
    results = tu.wait_all(procs, timeout=240)
    codes = sorted(rc for rc, _, _ in results)
    if codes == [0, 0]:  # legitimate only one after the other: the second found the first's run finished
        assert any("resumed from" in out and "at iteration 12" in out for _, out, _ in results), results
    else:
        assert codes == [0, 1], [err[-2000:] for _, _, err in results]
        refusal = next(err for rc, _, err in results if rc == 1)
        assert "is in use by another run" in refusal and "Traceback" not in refusal, refusal
    iterations = [m["iteration"] for m in tu.metrics(save) if "lm_loss" in m]
    assert iterations == list(range(1, 13)), iterations  # one run's records, not two interleaved
    r = _ok(tu.run(_args(data, save, 13, "--load", save)))  # `latest` names a checkpoint its manifest vouches for
    assert "resumed from" in r.stdout


# ---- defect 3: a full disk ----------------------------------------------------------------------------
@contextlib.contextmanager
def _small_tmpfs(size: str):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the free-space check is covered with a patched statvfs)")
    folder = tempfile.mkdtemp(prefix="mls-small-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(folder)
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", folder], check=False)
        os.rmdir(folder)


def _full_disk_run(data: str, save: str, extra_env: dict[str, str] | None = None) -> list[tuple[int, str, str]]:
    return tu.wait_all(tu.spawn_ranks(_args(data, save, 60, "--save-interval", "1"), world=2, extra_env=extra_env),
                    timeout=240)


def _assert_stopped_cleanly(save: str, results: list[tuple[int, str, str]], pattern: str) -> None:
    """One line on every rank, no partial folder, and `latest` names a checkpoint its manifest vouches for."""
    from megatron_ls.training.checkpointing import locate_checkpoint

    for rank, (rc, _, err) in enumerate(results):
        lines = tu.error_lines(err)
        assert rc == 1 and len(lines) == 1 and pattern in lines[0], (rank, err[-2000:])
        assert "Traceback" not in err
    assert not [n for n in os.listdir(save) if n.endswith(".partial")]
    latest = open(os.path.join(save, "latest")).read().strip()
    path, info = locate_checkpoint(save)
    assert path == os.path.join(save, latest) and info["world_size"] == 2


@pytest.mark.timeout(400)
def test_full_disk_stops_before_a_save_on_every_rank(data):
    with _small_tmpfs("3M") as small:
        save = os.path.join(small, "one")
        results = _full_disk_run(data, save)
        _assert_stopped_cleanly(save, results, "no room for checkpoint iter_")
        assert "is intact (free space or move the folder, then resume with --load" in results[0][2]


@pytest.mark.timeout(400)
def test_full_disk_in_the_middle_of_a_save_on_every_rank(data):
    with _small_tmpfs("3M") as small:
        save = os.path.join(small, "one")
        # The check before each save is told there is room: the disk fills in the middle of DeepSpeed's writes.
        results = _full_disk_run(data, save, {"MEGATRON_LS_TEST_FREE_BYTES": str(1 << 40)})
        _assert_stopped_cleanly(save, results, "failed: no space left on device (the checkpoint needs about ")
        assert "its partial folder was removed and the previous checkpoint iter_" in results[1][2]


@pytest.mark.timeout(300)
def test_no_room_for_the_first_save_with_a_patched_statvfs(data, tmp_path):
    save = str(tmp_path / "r")
    results = tu.wait_all(tu.spawn_ranks(_args(data, save, 6, "--save-interval", "3"), world=2,
                                   extra_env={"MEGATRON_LS_TEST_FREE_BYTES": "100000"}), timeout=240)
    for rc, _, err in results:
        assert rc == 1 and len(tu.error_lines(err)) == 1, err[-2000:]
        assert "no room for checkpoint iter_0000003" in err and "no checkpoint was saved yet" in err
    assert sorted(os.listdir(save)) == ["ds_config.json", "metrics.jsonl", "run.lock"]


# ---- defect 4: random bytes in `latest` -----------------------------------------------------------------
@pytest.mark.timeout(300)
def test_random_bytes_in_latest_is_one_line_on_every_rank(data, tmp_path):
    save = str(tmp_path / "r")
    _ok(tu.run(_args(data, save, 2)))
    with open(os.path.join(save, "latest"), "wb") as f:
        f.write(bytes(range(128, 192)))
    results = tu.wait_all(tu.spawn_ranks(_args(data, save, 4, "--load", save), world=2), timeout=240)
    for rc, _, err in results:
        assert rc == 1 and "Traceback" not in err and len(tu.error_lines(err)) == 1, err[-2000:]
        assert "latest is damaged (not text): delete it to read the newest complete checkpoint, iter_0000002" in err
    r = subprocess.run([sys.executable, os.path.join(tu.ROOT, "tools", "convert_checkpoint.py"), "--load", save,
                        "--output", str(tmp_path / "c")], env=tu.env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "latest is damaged (not text)" in r.stderr


# ---- defect 5: SIGTERM to the launcher ----------------------------------------------------------------
def _launch_and_signal(data: str, save: str, target: str, sig: int) -> tuple[int, str, str]:
    runner = tu.popen_deepspeed(["--num_gpus", "2", "--master_port", str(tu.free_port())],
                             _args(data, save, 100000, "--save-interval", "1000"))
    ranks: list[psutil.Process] = []
    try:
        tu.wait_for_metrics(save, 2, [runner])
        children = psutil.Process(runner.pid).children(recursive=True)
        ranks = [p for p in children if tu.SCRIPT in p.cmdline()[:3]]  # not launch.py, which names it later
        assert len(ranks) == 2, [p.cmdline() for p in children]
        victim = runner.pid if target == "runner" else psutil.Process(runner.pid).children()[0].pid
        os.kill(victim, sig)
        out, err = runner.communicate(timeout=120)  # EOF once every process holding the pipes has ended
        _, alive = psutil.wait_procs(ranks, timeout=60)
        assert not alive, "ranks train on after their launcher died"
    finally:
        for p in [runner, *ranks]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.kill()
    return runner.returncode, out, err


@pytest.mark.timeout(400)
@pytest.mark.parametrize("target,sig,status", [
    ("runner", signal.SIGTERM, -signal.SIGTERM),  # `kill` of the documented command; Kubernetes' first process
    ("runner", signal.SIGKILL, -signal.SIGKILL),
    ("launch.py", signal.SIGTERM, 1),  # DeepSpeed's launch.py forwards it, then exits 1 itself
])
def test_the_launchers_death_reaches_every_rank(data, tmp_path, target, sig, status):
    save = str(tmp_path / "r")
    rc, out, err = _launch_and_signal(data, save, target, sig)
    assert rc == status, err[-3000:]
    tag = open(os.path.join(save, "latest")).read().strip()
    iteration = int(tag[5:])
    assert f"stopped at iteration {iteration} after saving {tag}" in out, out[-2000:]
    assert [n for n in os.listdir(save) if n.startswith("iter_")] == [tag]  # one save, at the stop
    assert max(m["iteration"] for m in tu.metrics(save)) == iteration < 100000
    files = os.listdir(os.path.join(save, tag))
    assert "run_state_rank00000.pt" in files and "run_state_rank00001.pt" in files
    if target == "runner":
        assert "the deepspeed command (pid" in err and "exited: stopping as on SIGTERM" in err


# ---- smaller: extending a finished schedule -------------------------------------------------------------
COSINE = ["--lr", "5e-4", "--min-lr", "1e-5", "--lr-warmup-iters", "5", "--lr-decay-style", "cosine"]


def _cosine(total: int) -> dict:
    from megatron_ls.training.schedules import scheduler_config

    return {"scheduler": scheduler_config("cosine", 5e-4, 1e-5, 5, total), "lr": 5e-4}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("override", [False, True])
def test_extending_a_finished_cosine_run(data, tmp_path, override):
    from megatron_ls.training.schedule_resume import lr_at

    save = str(tmp_path / "r")
    _ok(tu.run(_args(data, save, 30, *COSINE)))
    extra = ["--override-opt_param-scheduler"] if override else []
    r = _ok(tu.run(_args(data, save, 40, *COSINE, "--load", save, *extra)))
    lr = {m["iteration"]: m["lr"] for m in tu.metrics(save) if "lr" in m}
    assert lr[30] == pytest.approx(1e-5)
    if override:
        assert "taking this run's learning-rate schedule" in r.stdout
        # The decay stretched to 40 iterations: the lr jumps back up from update 31 on, as asked.
        assert lr[31] == pytest.approx(lr_at(_cosine(40), 31)) and lr[31] > 5e-5
    else:
        assert "keeping the checkpoint's learning-rate schedule" in r.stdout
        assert "Pass --override-opt_param-scheduler to take the flags" in r.stdout
        assert all(lr[i] == pytest.approx(1e-5) for i in range(31, 41))


# ---- smaller: provenance ---------------------------------------------------------------------------------
def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(tu.ROOT, "tools", name), *args], env=tu.env(),
                          capture_output=True, text=True, timeout=180)


@pytest.mark.timeout(300)
def test_tools_record_which_checkpoint_they_read(data, tmp_path):
    save = str(tmp_path / "r")
    _ok(tu.run(_args(data, save, 10, "--save-interval", "5")))
    tag_dir = os.path.join(save, "iter_0000010")
    crc = f"{_crc(os.path.join(tag_dir, 'manifest.json')):08x}"
    want = {"checkpoint": tag_dir, "iteration": 10, "manifest_crc32": crc}
    _ok(_tool("evaluate.py", "--model", save, "--data-path", data, "--split", "test", "--context", "64", "--step",
              "32", "--max-tokens", "300", "--output", str(tmp_path / "bpc.json"), "--no-progress"))
    assert json.load(open(tmp_path / "bpc.json"))["checkpoint"] == want
    consolidated = str(tmp_path / "c")
    _ok(_tool("convert_checkpoint.py", "--load", save, "--output", consolidated))
    assert json.load(open(os.path.join(consolidated, "config.json")))["source"] == want
    for model, phrase in ((save, f"model {tag_dir} (iteration 10, manifest CRC {crc})"),
                          (consolidated, f"model {consolidated}, converted from {tag_dir} (iteration 10, manifest "
                                         f"CRC {crc})")):
        r = _ok(_tool("generate.py", "--model", model, "--prompt", "The ", "--max-new-tokens", "5", "--seed", "1"))
        assert phrase in r.stderr, r.stderr
