"""Up-front checks that an output (a file or a folder) can be written, before hours of work are spent on it."""

from __future__ import annotations

import os
import tempfile

from megatron_ls.errors import ConfigError


def check_writable(path: str, flag: str, folder: bool = False) -> None:
    """One ConfigError unless PATH can be written: a file, or with ``folder`` a folder (existing or not).

    Found by trying, not by os.access (which says yes to root even under /sys): a scratch file is created
    and removed in the deepest folder of PATH that exists, and an existing file is opened for appending
    without being changed. Nothing is left behind, not even a folder.
    """
    what = f"cannot write {flag} {path}"
    if folder:
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"{what}: it is a file, not a folder")
        base = os.path.abspath(path)
    else:
        if os.path.isdir(path):
            raise ConfigError(f"{what}: it is a directory")
        if os.path.exists(path):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
            except OSError as e:
                raise ConfigError(f"{what}: {e.strerror or e}") from None
            return
        base = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(base):  # the folders still to be created go into the first one that exists
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        raise ConfigError(f"{what}: {base} is a file, not a folder")
    try:
        fd, scratch = tempfile.mkstemp(dir=base, prefix=".write-check-")
    except OSError as e:
        raise ConfigError(f"{what}: cannot create files in {base}: {e.strerror or e}") from None
    os.close(fd)
    os.remove(scratch)
