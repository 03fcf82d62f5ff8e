"""training/run_folder.py: the --save folder's lock, its holder and a failed start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from fake_engine import saved

from megatron_ls.checkpoint import files
from megatron_ls.errors import ConfigError
from megatron_ls.training import run_folder


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
    saved(d, 1)
    lock = run_folder.RunFolderLock(d)
    lock.acquire()
    lock.release(failed_start=True)  # a folder with files is never removed
    assert files.complete_tags(d) == [(1, "iter_0000001")]
