"""The --save folder as a resource: one writer at a time, never another run's files overwritten, room checked.

- ``RunFolderLock``: rank 0 holds an flock on SAVE/run.lock for the run's whole life (the kernel drops it when
  the process dies, even by SIGKILL). A second run on the folder is refused with one line naming the holder
  (host and pid, written into the file). flock works across nodes on NFS (Linux maps it onto POSIX locks)
  and only global rank 0 takes it, so saves from many nodes into one shared folder are unaffected.
- ``previous_run``: what in a folder belongs to a run this one would overwrite: ``latest``, every complete
  ``iter_*`` folder (``latest`` may have been deleted), a metrics.jsonl.
- ``free_bytes`` / ``checkpoint_bytes``: the room a save needs against the room the file system has, so a run
  stops cleanly with its last checkpoint instead of failing in the middle of a save.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from typing import Any

from megatron_ls.checkpoint.files import LATEST, complete_tags, describe_latest, tag_name
from megatron_ls.checkpoint.manifest import tag_bytes
from megatron_ls.errors import CheckpointError, ConfigError, UserError

from . import checkpointing as ckpt
from .collectives import agree, global_rank, sum_over_ranks
from .disk_space import free_bytes, human_bytes
from .logging import METRICS_FILE

LOCK_FILE = "run.lock"


class RunFolderLock:
    """An exclusive, non-blocking flock on FOLDER/run.lock held until ``release`` or the process's death."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd: int | None = None
        self.created_folder = False

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming its holder. Creates the folder (and only the lock file)."""
        self.created_folder = not os.path.isdir(self.folder)
        os.makedirs(self.folder, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise ConfigError(f"--save {self.folder} is in use by another run ({self._holder()}): one run writes "
                                  "a folder at a time; wait for it to end, stop it, or choose another --save") from None
            if _same_file(fd, self.path):  # not a lock file that a failed start removed meanwhile
                break
            os.close(fd)
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()} since {stamp}\n".encode())
        self.fd = fd

    def _holder(self) -> str:
        try:
            with open(self.path, "rb") as f:
                text = f.read(200).decode("utf-8", "replace").strip()
        except OSError:
            text = ""
        return text or "holder unknown"

    def release(self, failed_start: bool = False) -> None:
        """Drop the lock. After a start that failed before writing anything, a folder this run created holding
        only the lock file is removed again (nothing else was there, so nothing is lost)."""
        if self.fd is None:
            return
        try:
            if failed_start and self.created_folder and os.listdir(self.folder) == [LOCK_FILE]:
                os.unlink(self.path)  # still locked: a run that opened the old file re-checks and retries
                os.rmdir(self.folder)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def hold_run_folder(folder: str | None, continuing: bool) -> Iterator[None]:
    """Collective: global rank 0 holds FOLDER's lock for the block, and under it checks again that the folder
    holds no other run's files (two runs started at once both passed the check before the lock)."""
    if not folder:
        yield
        return
    lock = RunFolderLock(folder)

    def take() -> None:
        if global_rank() == 0:
            lock.acquire()
            check_no_previous_run(folder, continuing)

    try:
        agree(take, "taking the --save folder")
    except UserError:
        lock.release(failed_start=True)
        raise
    done = False
    try:
        yield
        done = True
    finally:
        lock.release(failed_start=not done)


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def previous_run(folder: str) -> str | None:
    """A description of another run's files in FOLDER that a fresh run would overwrite, or None."""
    if not os.path.isdir(folder):
        return None
    if os.path.isfile(os.path.join(folder, LATEST)):
        return f"a checkpoint ({describe_latest(folder)})"
    tags = complete_tags(folder)
    if tags:
        return f"{len(tags)} complete checkpoint{'s' if len(tags) > 1 else ''} (newest {tags[-1][1]}, no 'latest')"
    metrics = os.path.join(folder, METRICS_FILE)
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        return f"another run's {METRICS_FILE} (no checkpoint)"
    return None


def check_no_previous_run(folder: str, continuing: bool) -> None:
    """Refuse a fresh run whose --save holds another run's files (``continuing``: --load is this folder)."""
    found = None if continuing else previous_run(folder)
    if found:
        raise ConfigError(f"--save {folder} already holds {found} that this run would overwrite: to continue that "
                          f"run pass --load {folder} (without --finetune); to start over, delete it or choose "
                          "another --save folder")


# ---- room for a save ------------------------------------------------------------------------
def checkpoint_bytes(folder: str, first_estimate: int) -> int:
    """The bytes the next save will write: the newest complete checkpoint's (from its manifest) or, before the
    first save, ``first_estimate``; whichever is larger (the memory cache fills as the streams grow)."""
    tags = complete_tags(folder)
    last = tag_bytes(os.path.join(folder, tags[-1][1])) if tags else 0
    return max(last, first_estimate)


def check_room(folder: str, iteration: int, local_estimate: int) -> int:
    """Collective, before a save: the bytes it will write; a CheckpointError on every rank when the file system
    of FOLDER has less room than that (with a 5% margin), so the run stops with its last checkpoint intact."""
    need = checkpoint_bytes(folder, sum_over_ranks(local_estimate))

    def check() -> None:
        if global_rank() != 0:
            return
        free = free_bytes(folder)
        if free < need + need // 20:
            tags = complete_tags(folder)
            kept = f"the last checkpoint {tags[-1][1]} is intact" if tags else "no checkpoint was saved yet"
            raise CheckpointError(f"no room for checkpoint {tag_name(iteration)} in {folder}: it needs about "
                                  f"{human_bytes(need)}, {human_bytes(free)} are free; the run stops here and {kept} "
                                  f"(free space or move the folder, then resume with --load {folder})")

    ckpt.agree_on_checkpoint(check, "the free-space check before saving")
    return need


def state_bytes(engine: Any, local_state: dict[str, Any]) -> int:
    """This rank's share of a checkpoint before any was written: its module weights, the fp32 master copy and
    Adam's two moments (12 bytes a parameter, stored once over the ranks that share the weights), and its own
    run state (memory cache). An estimate; the manifest of the first save replaces it."""
    import torch

    from megatron_ls.parallel import mpu

    params = {id(p): p for p in engine.module.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    optimizer = sum(p.numel() for p in params) * 12
    dp = mpu.get_data_parallel_world_size() if mpu.model_parallel_is_initialized() else 1
    share = (weights + optimizer) // max(dp, 1)
    own = sum(t.numel() * t.element_size() for t in _tensors(local_state) if isinstance(t, torch.Tensor))
    return share + own + (64 << 10)  # file headers, pickled structure, RNG states


def _tensors(obj: Any):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    else:
        yield obj
