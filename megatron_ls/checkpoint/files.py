"""The on-disk layout of a --save folder: names, tags, `latest`, and the atomic writes that publish them.

    SAVE/latest                    the tag of the newest complete checkpoint (written last)
    SAVE/iter_0001000/             DeepSpeed's files and the run's: run_state_rank*.pt, run_state.json,
                                   manifest.json (every file's size and CRC-32, written last)
    SAVE/iter_0001000.partial/     a save in progress, or one a crash interrupted: never read
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from megatron_ls.errors import CheckpointError

LATEST = "latest"
MANIFEST = "manifest.json"
RUN_INFO = "run_state.json"
PARTIAL = ".partial"
TAG_RE = re.compile(r"^iter_(\d{7,})$")


def tag_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def run_state_file(rank: int) -> str:
    return f"run_state_rank{rank:05d}.pt"


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def write_json(path: str, obj: Any) -> None:
    """PATH replaced whole (a temporary file, fsync, rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish_tag(partial: str, final: str) -> None:
    """Rename a finished TAG.partial folder to TAG, replacing an older TAG of the same name (a re-save)."""
    if os.path.exists(final):
        old = final + f".old{os.getpid()}"
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))


def write_latest(save_dir: str, tag: str) -> None:
    """Point `latest` at a complete tag, atomically (written after the tag itself)."""
    latest_tmp = os.path.join(save_dir, f"{LATEST}.tmp{os.getpid()}")
    with open(latest_tmp, "w") as f:
        f.write(tag + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest_tmp, os.path.join(save_dir, LATEST))
    fsync_dir(save_dir)


def complete_tags(save_dir: str) -> list[tuple[int, str]]:
    """(iteration, tag) of the complete checkpoint folders (those with a manifest), oldest first."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        m = TAG_RE.match(name)
        if m and os.path.isfile(os.path.join(save_dir, name, MANIFEST)):
            found.append((int(m.group(1)), name))
    return sorted(found)


def has_checkpoint(load_dir: str) -> bool:
    """A `latest` file, or a complete checkpoint folder (`latest` may have been deleted)."""
    return os.path.isfile(os.path.join(load_dir, LATEST)) or bool(complete_tags(load_dir))


def read_latest(folder: str) -> str | None:
    """The tag `latest` names, or None when it is missing or damaged (never raises)."""
    try:
        with open(os.path.join(folder, LATEST), "rb") as f:
            tag = f.read(4096).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag or None


def describe_latest(folder: str) -> str:
    return read_latest(folder) or f"'{LATEST}' unreadable"


def find_tag(load_dir: str) -> tuple[str, str]:
    """(tag, note) of the checkpoint to read from a --save folder: the one `latest` names; without `latest`
    (deleted), the newest complete one, with a note that says so. CheckpointError when there is none or
    `latest` is damaged (not guessed over: it may name an older checkpoint on purpose)."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir}: checkpoint directory not found")
    latest = os.path.join(load_dir, LATEST)
    tags = complete_tags(load_dir)
    if not os.path.isfile(latest):
        if not tags:
            raise CheckpointError(f"--load {load_dir}: no checkpoint there (no '{LATEST}' file naming one)")
        return tags[-1][1], f"no '{LATEST}' file in {load_dir}: reading its newest complete checkpoint {tags[-1][1]}"
    newest = f", {tags[-1][1]}" if tags else ""
    try:
        with open(latest, "rb") as f:
            tag = f.read(4096).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{latest} is damaged (not text): delete it to read the newest complete "
                              f"checkpoint{newest}") from None
    if not tag or "/" in tag:
        raise CheckpointError(f"{latest}: does not name a checkpoint (content {tag!r})")
    if not os.path.isdir(os.path.join(load_dir, tag)):
        raise CheckpointError(f"{latest} names {tag!r} but {os.path.join(load_dir, tag)} does not exist")
    return tag, ""
