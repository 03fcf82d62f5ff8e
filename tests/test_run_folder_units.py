"""The run folder as a resource, piece by piece: `latest` deleted or damaged, another run's files, the folder's
lock, room for a save, a write failing mid-save, the schedule of a resumed run, launcher detection, pipes as
preprocessing inputs."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from megatron_ls.checkpoint import files
from megatron_ls.checkpoint.manifest import tag_bytes
from megatron_ls.data.preprocess import preprocess_text
from megatron_ls.errors import CheckpointError, ConfigError, DataError
from megatron_ls.training import checkpointing as ckpt
from megatron_ls.training import run_folder
from megatron_ls.training.launcher_watch import launcher_kind
from megatron_ls.training.schedule_resume import lr_at, resolve_schedule
from megatron_ls.training.schedules import scheduler_config


class FakeEngine:
    """DeepSpeed's save as far as the ranks' agreement goes: files first, its closing barrier last."""

    def __init__(self, value: float = 0.0, fail_rank: int | None = None) -> None:
        self.value, self.fail_rank = value, fail_rank

    def save_checkpoint(self, save_dir, tag, client_state=None, save_latest=True):
        rank = dist.get_rank() if dist.is_initialized() else 0
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        if rank == self.fail_rank:
            raise OSError(errno.ENOSPC, "No space left on device")
        torch.save({"w": torch.tensor([self.value])},
                   os.path.join(save_dir, tag, f"mp_rank_{rank:02d}_model_states.pt"))
        if dist.is_initialized():
            dist.barrier()


def _saved(d: str, *iterations: int) -> None:
    for it in iterations:
        ckpt.save_checkpoint(FakeEngine(it), d, it, {}, {"model": {}, "run": {}})


# ---- `latest` deleted or damaged --------------------------------------------------------------
def test_deleted_latest_reads_the_newest_complete_checkpoint(tmp_path, capsys):
    d = str(tmp_path / "ck")
    _saved(d, 5, 10)
    os.makedirs(os.path.join(d, "iter_0000015.partial"))  # never a candidate
    os.remove(os.path.join(d, "latest"))
    assert files.has_checkpoint(d)
    path, info = ckpt.locate_checkpoint(d)
    assert path.endswith("iter_0000010") and info["iteration"] == 10
    assert "no 'latest' file" in capsys.readouterr().out


def test_damaged_latest_is_one_clear_error(tmp_path):
    d = str(tmp_path / "ck")
    _saved(d, 5)
    with open(os.path.join(d, "latest"), "wb") as f:
        f.write(bytes(range(128, 192)))  # not UTF-8: was a UnicodeDecodeError traceback
    with pytest.raises(CheckpointError, match=r"latest is damaged \(not text\): delete it .* iter_0000005"):
        ckpt.locate_checkpoint(d)
    assert files.read_latest(d) is None


@pytest.mark.parametrize("content,found", [
    ("latest", "a checkpoint (iter_0000005)"),
    ("tags", "1 complete checkpoint (newest iter_0000005, no 'latest')"),
    ("metrics", "another run's metrics.jsonl (no checkpoint)"),
    ("partial-only", None),
])
def test_previous_run_sees_every_kind_of_file(tmp_path, content, found):
    d = str(tmp_path / "ck")
    if content in ("latest", "tags"):
        _saved(d, 5)
        if content == "tags":
            os.remove(os.path.join(d, "latest"))
    else:
        os.makedirs(os.path.join(d, "iter_0000005.partial"))
        if content == "metrics":
            with open(os.path.join(d, "metrics.jsonl"), "w") as f:
                f.write('{"iteration": 1}\n')
    assert run_folder.previous_run(d) == found
    if found:
        with pytest.raises(ConfigError, match=f"--save {d} already holds .* that this run would overwrite"):
            run_folder.check_no_previous_run(d, continuing=False)
    run_folder.check_no_previous_run(d, continuing=True)  # --load of the same folder continues it


# ---- the folder's lock ----------------------------------------------------------------------------
def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    d = str(tmp_path / "ck")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from megatron_ls.training.run_folder import RunFolderLock\n"
        f"RunFolderLock({d!r}).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"--save {d} is in use by another run \(host \S+ pid {holder.pid} "):
            run_folder.RunFolderLock(d).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = run_folder.RunFolderLock(d)  # the kernel dropped the dead holder's lock
    lock.acquire()
    lock.release()
    assert os.path.isfile(os.path.join(d, run_folder.LOCK_FILE))


def test_lock_of_a_failed_start_leaves_no_folder(tmp_path):
    d = str(tmp_path / "new" / "ck")
    lock = run_folder.RunFolderLock(d)
    lock.acquire()
    lock.release(failed_start=True)
    assert not os.path.exists(d)
    _saved(d, 1)
    lock = run_folder.RunFolderLock(d)
    lock.acquire()
    lock.release(failed_start=True)  # a folder with files is never removed
    assert files.complete_tags(d) == [(1, "iter_0000001")]


# ---- room for a save ------------------------------------------------------------------------------
def test_room_check_before_a_save(tmp_path, monkeypatch):
    d = str(tmp_path / "ck")
    _saved(d, 5)
    size = tag_bytes(os.path.join(d, "iter_0000005"))
    assert size > 0
    assert run_folder.checkpoint_bytes(d, 10) == size and run_folder.checkpoint_bytes(d, 10 * size) == 10 * size
    monkeypatch.setenv("MEGATRON_LS_TEST_FREE_BYTES", str(size))  # less than size + 5%
    with pytest.raises(CheckpointError, match=r"no room for checkpoint iter_0000010 in .*: it needs about .*, "
                                              r".* are free; the run stops here and the last checkpoint "
                                              r"iter_0000005 is intact"):
        run_folder.check_room(d, 10, 0)
    monkeypatch.setenv("MEGATRON_LS_TEST_FREE_BYTES", str(2 * size))
    assert run_folder.check_room(d, 10, 0) == size


def _save_fails_on_rank1(rank: int, world: int, d: str) -> None:
    ckpt.save_checkpoint(FakeEngine(1), d, 1, {}, {"model": {}, "run": {}})
    with pytest.raises(CheckpointError) as e:
        ckpt.save_checkpoint(FakeEngine(2, fail_rank=1), d, 2, {}, {"model": {}, "run": {}}, expected_bytes=1 << 20)
    text = str(e.value)
    assert "saving checkpoint iter_0000002 into" in text and "no space left on device" in text, text
    assert "the previous checkpoint iter_0000001 and 'latest' are intact" in text, text
    dist.barrier()
    assert not os.path.exists(os.path.join(d, "iter_0000002.partial"))
    assert files.read_latest(d) == "iter_0000001"
    ckpt.save_checkpoint(FakeEngine(3), d, 3, {}, {"model": {}, "run": {}})  # the ranks are still in step


@pytest.mark.timeout(120)
def test_a_write_failing_on_one_rank_fails_the_save_on_every_rank(tmp_path):
    run_distributed(_save_fails_on_rank1, 2, str(tmp_path / "ck"), timeout=100)


# ---- the schedule of a resumed run -----------------------------------------------------------------
def _schedule(total: int, lr: float = 5e-4) -> dict:
    return {"scheduler": scheduler_config("cosine", lr, 1e-5, 5, total), "lr": lr}


def test_lr_at_follows_the_run_numbering():
    s = _schedule(30)
    assert lr_at(s, 1) == pytest.approx(5e-4 / 5)  # update 1 of 5 warm-up updates
    assert lr_at(s, 30) == pytest.approx(1e-5) and lr_at(s, 31) == pytest.approx(1e-5)  # stays at the floor


def test_extended_cosine_run_keeps_the_checkpoints_schedule():
    info = {"schedule": _schedule(30), "iteration": 30}
    ds = {"scheduler": _schedule(60)["scheduler"], "optimizer": {"params": {"lr": 5e-4}}}
    kept, line = resolve_schedule(info, ds, override=False, iteration=30)
    assert kept == _schedule(30) and "keeping the checkpoint's learning-rate schedule" in line
    assert "--override-opt_param-scheduler" in line and "update 31 is 1e-05 by the checkpoint's" in line
    taken, line = resolve_schedule(info, ds, override=True, iteration=30)
    assert taken is None and "taking this run's learning-rate schedule" in line
    assert resolve_schedule({"schedule": _schedule(60)}, ds, override=False, iteration=30) == (None, "")


def test_schedule_of_an_older_checkpoint_is_rebuilt_from_its_flags():
    run = {"lr_decay_style": "cosine", "lr": 5e-4, "min_lr": 1e-5, "lr_warmup_iters": 5, "train_iters": 30}
    ds = {"scheduler": _schedule(60)["scheduler"], "optimizer": {"params": {"lr": 5e-4}}}
    kept, _ = resolve_schedule({"run": run}, ds, override=False, iteration=30)
    assert kept == _schedule(30)
    kept, _ = resolve_schedule({"run": dict(run, deepspeed_config="x.json")}, ds, override=False, iteration=30)
    assert kept is None  # the user's own JSON made it: not guessed


# ---- launchers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,kind", [
    (["/v/bin/python", "/v/bin/deepspeed", "--num_gpus", "2", "train.py"], "the deepspeed command"),
    (["/v/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"], "DeepSpeed's launch.py"),
    (["/v/bin/python", "/v/bin/torchrun", "--nproc_per_node", "2"], "torchrun"),
    (["/v/bin/python", "-m", "torch.distributed.run", "x.py"], "torchrun"),
    (["/bin/bash", "run.sh"], None),
    (["/v/bin/python", "pretrain_char_lm.py", "--data-path", "deepspeed"], None),
])
def test_launcher_kind(argv, kind):
    assert launcher_kind(argv) == kind


# ---- pipes as inputs ------------------------------------------------------------------------------
def test_text_from_a_pipe_equals_the_file(tmp_path):
    text = b"the quick brown fox jumps over the lazy dog\n" * 300
    (tmp_path / "a.txt").write_bytes(text)
    fifo = str(tmp_path / "pipe")
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: open(fifo, "wb").write(text))
    writer.start()
    piped = preprocess_text([fifo], str(tmp_path / "out" / "p"), progress=False)
    writer.join()
    plain = preprocess_text([str(tmp_path / "a.txt")], str(tmp_path / "out" / "f"), progress=False)
    assert piped.input_bytes == plain.input_bytes == len(text)
    for split in ("train", "valid", "test"):
        assert (tmp_path / "out" / f"p_{split}.bin").read_bytes() == (tmp_path / "out" / f"f_{split}.bin").read_bytes()
    assert [n for n in os.listdir(tmp_path / "out") if ".tmp-" in n] == []  # the spooled copy is gone


def test_zip_from_a_pipe_is_refused_without_reading(tmp_path):
    from megatron_ls.data.corpora import CORPORA
    from megatron_ls.data.preprocess import preprocess_corpus

    fifo = str(tmp_path / "enwik8.zip")
    os.mkfifo(fifo)  # no writer: opening it would block forever
    with pytest.raises(DataError, match="is a pipe or a device, not a regular file: a zip is read by seeking"):
        preprocess_corpus(CORPORA["enwik8"], fifo, str(tmp_path / "e"), progress=False)
