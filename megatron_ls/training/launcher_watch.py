"""A rank whose launcher died stops as if it had received SIGTERM: it saves and exits instead of training on
unsupervised.

`deepspeed pretrain_char_lm.py` is three generations of processes: the `deepspeed` runner, DeepSpeed's
`launch.py`, the ranks. The runner handles no signal on one node: a SIGTERM sent to it (what Kubernetes or a
scheduler sends to the command it started) kills it alone and leaves the ranks training, orphaned. So each rank
watches every launcher among its ancestors (DeepSpeed's runner and launch.py, torchrun) through a pidfd
(Linux >= 5.3: it cannot be fooled by a reused pid) and, when one of them exits, sends itself SIGTERM: the
training loop's handler finishes the step, saves and exits 0; during start-up it is the usual one line.
Elsewhere (no pidfd) nothing is watched.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading

# Markers in a process's command line that make it a launcher of ranks.
_LAUNCHERS = (("deepspeed.launcher.launch", "DeepSpeed's launch.py"),
              ("deepspeed.launcher.runner", "the deepspeed command"),
              ("/deepspeed", "the deepspeed command"),
              ("torch.distributed.run", "torchrun"),
              ("/torchrun", "torchrun"))
_MAX_DEPTH = 4  # rank <- launch.py <- runner (<- a wrapper such as a shell script with `exec`-less call)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ')' ends it.
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def launcher_kind(argv: list[str]) -> str | None:
    """Which launcher a command line is, if any (its first words: python [-u] -m X, or python X)."""
    head = " ".join(argv[:5])
    for marker, name in _LAUNCHERS:
        if marker.startswith("/"):
            if any(a == marker[1:] or a.endswith(marker) for a in argv[:2]):
                return name
        elif marker in head:
            return name
    return None


def launcher_ancestors(pid: int | None = None) -> list[tuple[int, str]]:
    """(pid, what) of the launchers among this process's nearest ancestors, nearest first."""
    found = []
    pid = os.getppid() if pid is None else pid
    for _ in range(_MAX_DEPTH):
        if pid <= 1:
            break
        kind = launcher_kind(_cmdline(pid))
        if kind:
            found.append((pid, kind))
        pid = _parent(pid)
    return found


class LauncherWatch:
    """A daemon thread that turns the exit of any launcher ancestor into a SIGTERM to this process."""

    def __init__(self) -> None:
        self.gone: str = ""  # which launcher exited, once one did
        self._fds: dict[int, tuple[int, str]] = {}
        self._stop_r, self._stop_w = -1, -1
        self._thread: threading.Thread | None = None

    def start(self) -> LauncherWatch:
        if not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"):
            return self
        for pid, kind in launcher_ancestors():
            try:
                self._fds[os.pidfd_open(pid)] = (pid, kind)
            except OSError:  # already gone, or not allowed: the parent check below still covers launch.py
                continue
        if not self._fds:
            return self
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="launcher-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        poller = select.poll()
        for fd in (*self._fds, self._stop_r):
            poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll():
            if fd == self._stop_r:
                return
            pid, kind = self._fds[fd]
            self.gone = f"{kind} (pid {pid})"
            print(f"[rank {os.environ.get('RANK', '0')}] pretrain_char_lm.py: {self.gone} exited: stopping as on "
                  "SIGTERM (save, then exit)", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return

    def stop(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(timeout=5)
            self._thread = None
        for fd in (*self._fds, self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._fds.clear()
        self._stop_r = self._stop_w = -1

    def __enter__(self) -> LauncherWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
