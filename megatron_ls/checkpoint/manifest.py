"""manifest.json: every file of a checkpoint with its size and CRC-32, written last, checked before any read.

The trainer checks a share of the CRCs on each rank (sizes on all); the tools check everything.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

from megatron_ls.errors import CheckpointError

from .files import MANIFEST, write_json


def crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def _list_files(root: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def write_manifest(tag_dir: str, iteration: int, tag: str, world_size: int) -> None:
    """Record every file of a finished tag with its size and CRC-32 (the last file of a tag)."""
    files = {p: {"bytes": os.path.getsize(os.path.join(tag_dir, p)), "crc32": crc32(os.path.join(tag_dir, p))}
             for p in _list_files(tag_dir)}
    write_json(os.path.join(tag_dir, MANIFEST),
               {"iteration": iteration, "tag": tag, "world_size": world_size, "files": files})


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of checkpoint folder PATH; CheckpointError when it is missing or not a manifest."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise CheckpointError(f"checkpoint {path} is incomplete: no {MANIFEST} (a checkpoint that another tool "
                              "wrote can start a run with --finetune, which reads its weights only)")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(m, dict) for m in files.values()):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} is not a valid manifest") from None
    return manifest


def verify_files(path: str, files: dict[str, dict], rank: int = 0, world: int = 1) -> None:
    """Every file there with its recorded size; this rank's share (every world-th file) with its CRC-32."""
    for i, name in enumerate(sorted(files)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        size = os.path.getsize(full)
        want = files[name].get("bytes", size)
        if size != want:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {size:,} bytes, the manifest says "
                                  f"{want:,}")
        # Same-size damage (flipped bits) only shows in the checksum.
        if i % world == rank and "crc32" in files[name] and crc32(full) != files[name]["crc32"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} fails its CRC-32 check")


def tag_bytes(path: str) -> int:
    """The bytes of a complete checkpoint folder, from its manifest (0 when unreadable)."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return sum(int(v["bytes"]) for v in json.load(f)["files"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


def manifest_crc32(path: str) -> str:
    """The CRC-32 of a checkpoint folder's manifest (which holds every file's CRC): names that exact checkpoint."""
    try:
        return f"{crc32(os.path.join(path, MANIFEST)):08x}"
    except OSError:
        return ""
