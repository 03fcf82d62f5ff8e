"""Temporary files of the command-line tools, and the leftovers of runs killed without cleanup.

A tool writes NAME under the temporary name ``NAME.tmp-HOST-PID`` (a folder: ``NAME.tmp-HOST-PID.XXXXXXXX``)
and renames it into place or removes it at the end. A run killed by SIGKILL cannot remove it; the next
run writing NAME calls ``sweep([NAME, ...])``, which removes those of dead processes of this host. Those of
another host (a shared file system may hold a live run of another machine) and of live processes are kept.

Only the standard library: the tools import this before anything heavy.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable

_MARK = ".tmp-"
# What follows NAME.tmp-HOST-: the pid, for a folder also tempfile's random part (no '-' in either).
_REST = re.compile(r"(?P<pid>[0-9]+)(?:\.[A-Za-z0-9_]+)?")


def host_name() -> str:
    """This machine's name as it appears in temporary names (only letters, digits, '.', '_', '-')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def temp_name(path: str) -> str:
    """The temporary name of PATH for this process: ``PATH.tmp-HOST-PID``."""
    return f"{path}{_MARK}{host_name()}-{os.getpid()}"


def temp_dir(path: str) -> tempfile.TemporaryDirectory:
    """A temporary folder beside PATH, ``PATH.tmp-HOST-PID.XXXXXXXX``, removed when the block ends."""
    return tempfile.TemporaryDirectory(prefix=os.path.basename(temp_name(path)) + ".",
                                       dir=os.path.dirname(os.path.abspath(path)))


def leftover_pid(entry: str, name: str, host: str) -> int | None:
    """The pid in ENTRY when it is a temporary name of NAME (file names, no folder) written on HOST."""
    start = f"{name}{_MARK}{host}-"
    if not entry.startswith(start):
        return None
    m = _REST.fullmatch(entry[len(start):])
    return int(m["pid"]) if m else None


def pid_alive(pid: int) -> bool:
    """Whether process PID exists on this machine (one of another user's counts as alive)."""
    if pid <= 0:
        return True  # not a pid of a process: keep whatever it names
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    return True


def sweep(paths: Iterable[str], quiet: bool = False) -> int:
    """Remove the temporary files and folders of PATHS left by dead processes of this host; the count.

    Unless ``quiet`` one line on stderr says how many, when there were any.
    """
    host = host_name()
    wanted: dict[str, set[str]] = {}
    for path in paths:
        path = os.path.abspath(path)
        wanted.setdefault(os.path.dirname(path), set()).add(os.path.basename(path))
    removed = 0
    for folder, names in wanted.items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            pid = next((p for n in names if (p := leftover_pid(entry, n, host)) is not None), None)
            if pid is None or pid_alive(pid):
                continue
            full = os.path.join(folder, entry)
            try:
                if os.path.isdir(full) and not os.path.islink(full):
                    shutil.rmtree(full)
                else:
                    os.remove(full)
            except FileNotFoundError:
                continue  # another run removed it first
            except OSError:
                continue  # not ours to remove (permissions): leave it
            removed += 1
    if removed and not quiet:
        print(f"removed {removed} temporary file{'s' if removed != 1 else ''} left by killed runs",
              file=sys.stderr)
    return removed
