"""Free room on the file system of a folder (with a test hook to fake a full disk without mounting one)."""

from __future__ import annotations

import os

# Test hook only: the free bytes every folder's file system reports.
FREE_BYTES_ENV = "MEGATRON_LS_TEST_FREE_BYTES"


def free_bytes(folder: str) -> int:
    """What the check before a save goes by (the test hook may fake it)."""
    fake = os.environ.get(FREE_BYTES_ENV)
    return int(fake) if fake else statvfs_free(folder)


def statvfs_free(folder: str) -> int:
    """The bytes the file system really has free for this user (never faked: explains a failed write)."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def human_bytes(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / 2**shift:,.1f} {unit}"
    return f"{n} B"
