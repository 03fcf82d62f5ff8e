"""A `lock` file left in DeepSpeed's op build folder by a killed start must not hang the next start; one held
by a live process of ours must be waited for, not removed."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

import pytest
from repo_paths import REPO_ROOT

from megatron_ls.training.op_build_guard import SHM_OP, op_build_folder

ROOT = REPO_ROOT
LOAD = "from megatron_ls.training.op_build_guard import load_shm_op_guarded; load_shm_op_guarded()"


@pytest.fixture
def build_folder() -> str:
    folder = op_build_folder(SHM_OP)
    if folder is None or not os.path.isfile(os.path.join(folder, f"{SHM_OP}.so")):
        pytest.skip("DeepSpeed's CPU op is not built here (scripts/prebuild_ds_ops.sh builds it before the suite)")
    yield folder
    if os.path.exists(os.path.join(folder, "lock")):
        os.remove(os.path.join(folder, "lock"))


def _load() -> subprocess.Popen:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.Popen([sys.executable, "-c", LOAD], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(120)
def test_stale_lock_is_removed(build_folder):
    open(os.path.join(build_folder, "lock"), "w").close()
    p = _load()
    out, err = p.communicate(timeout=90)  # without the guard: waits forever
    assert p.returncode == 0, err[-2000:]
    assert "removed" in err and "left by a process killed" in err
    assert not os.path.exists(os.path.join(build_folder, "lock"))


@pytest.mark.timeout(120)
def test_lock_of_a_live_loader_is_waited_for(build_folder):
    flock = os.path.join(os.path.dirname(build_folder), f".{SHM_OP}.megatron_ls.flock")
    with open(flock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a process of ours inside the load would
        open(os.path.join(build_folder, "lock"), "w").close()
        p = _load()
        time.sleep(3)
        assert p.poll() is None and os.path.exists(os.path.join(build_folder, "lock"))
    # The holder is gone (its flock released, as the kernel does when a process dies): now the lock is stale.
    out, err = p.communicate(timeout=90)
    assert p.returncode == 0, err[-2000:]
    assert not os.path.exists(os.path.join(build_folder, "lock"))
