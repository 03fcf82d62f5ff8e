"""enwik8 / text8: where they come from, how big they are, how they are split, how to read them.

Inputs are read as a stream of blocks, from the raw file or straight out of the .zip (member
``enwik8`` / ``text8``), so memory stays bounded whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import stat
import sys
import threading
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from megatron_ls.errors import DataError

BLOCK_SIZE = 1 << 20  # zipfile inflates fastest in blocks of about 1 MiB


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    member: str  # the file inside the canonical .zip
    url: str
    size: int  # bytes of the member
    split: tuple[int, int, int]  # tokens of train / valid / test, in file order
    tokenizer: str  # "byte" or "text8"
    checksum: tuple[str, str]  # (hashlib algorithm, hex digest) of the member


# Checksums of the uncompressed members: enwik8's md5 is the one published with the Large
# Text Compression Benchmark; text8's sha1 is the one MXNet/GluonNLP pin for the same file.
CORPORA: dict[str, CorpusSpec] = {
    "enwik8": CorpusSpec(
        "enwik8",
        "enwik8",
        "http://mattmahoney.net/dc/enwik8.zip",
        100_000_000,
        (90_000_000, 5_000_000, 5_000_000),
        "byte",
        ("md5", "a1fa5ffddb56f4953e226637dabbb36a"),
    ),
    "text8": CorpusSpec(
        "text8",
        "text8",
        "http://mattmahoney.net/dc/text8.zip",
        100_000_000,
        (90_000_000, 5_000_000, 5_000_000),
        "text8",
        ("sha1", "0dc3edebc970dcc96137e7deda4d9995af9d93de"),
    ),
}

SPLIT_NAMES = ("train", "valid", "test")


def split_bounds(total: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of ``total`` items in proportion to ``weights``."""
    # nan passes `w < 0`, and inf makes the proportions nan: both are refused as not finite.
    if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or not 0 < sum(weights) < math.inf:
        raise DataError(f"split weights must be three finite non-negative numbers, not all 0, got {list(weights)}")
    cum = [0.0]
    for w in weights:
        cum.append(cum[-1] + w)
    edges = [round(total * c / cum[-1]) for c in cum]
    return [(edges[i], edges[i + 1]) for i in range(3)]


class InputFile:
    """One input: a raw file, or a member of a .zip; ``size`` is known before reading."""

    def __init__(self, path: str, member: str | None = None) -> None:
        self.path = path
        self.member = None
        if not os.path.exists(path):
            raise DataError(f"input file not found: {path}")
        if os.path.isdir(path):
            raise DataError(f"input is a directory, not a file: {path}")
        if not stat.S_ISREG(os.stat(path).st_mode):  # never opened: a pipe without a writer would block
            what = "a zip is read by seeking" if member is not None or path.endswith(".zip") else \
                "its size must be known before it is read"
            raise DataError(f"input {path} is a pipe or a device, not a regular file: {what}; save it to a file first")
        if member is not None and zipfile.is_zipfile(path):
            try:
                with zipfile.ZipFile(path) as zf:
                    names = zf.namelist()
                    if member not in names:
                        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                        raise DataError(f"{path}: the zip has no member {member!r} (it holds: {shown or 'nothing'})")
                    self.size = zf.getinfo(member).file_size
            except zipfile.BadZipFile as e:
                raise DataError(f"{path}: corrupt zip file ({e})") from None
            self.member = member
        elif path.endswith(".zip"):
            if member is None:
                raise DataError(f"{path}: zip archives are read only for enwik8/text8; extract it first")
            raise DataError(f"{path}: not a valid zip file")
        else:
            self.size = os.path.getsize(path)

    @property
    def label(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path

    def blocks(self, block_size: int = BLOCK_SIZE) -> Iterator[bytes]:
        """The bytes in order; checks that exactly ``size`` bytes come out (and the zip CRC)."""
        n = 0
        try:
            if self.member is not None:
                with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
                    while block := f.read(block_size):
                        n += len(block)
                        yield block
            else:
                with open(self.path, "rb") as f:
                    while block := f.read(block_size):
                        n += len(block)
                        yield block
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise DataError(f"{self.label}: corrupt or truncated data ({e})") from None
        if n != self.size:
            raise DataError(f"{self.label}: expected {self.size:,} bytes, read {n:,} (file changed?)")


def open_corpus(spec: CorpusSpec, path: str) -> InputFile:
    """Open enwik8/text8 (zip or raw) and check its size before anything is read."""
    src = InputFile(path, spec.member)
    if src.size != spec.size:
        raise DataError(f"{src.label}: {spec.name} must be {spec.size:,} bytes, this file has {src.size:,}")
    return src


def member_digest(src: InputFile, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    for block in src.blocks():
        h.update(block)
    return h.hexdigest()


def _resolve(host: str, timeout: float) -> None:
    """DNS lookup with a deadline (getaddrinfo itself cannot be given one)."""
    result: list[BaseException | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 80)
            result.append(None)
        except OSError as e:
            result.append(e)

    t = threading.Thread(target=lookup, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise OSError(f"no answer resolving {host} within {timeout:.0f} s")
    if result[0] is not None:
        raise result[0]


def download(spec: CorpusSpec, dest: str, timeout: float = 10.0, progress: bool = True) -> None:
    """Fetch ``spec.url`` to ``dest`` (via a .part file) and verify the member's checksum."""
    from urllib.parse import urlparse

    from tqdm import tqdm

    part = dest + ".part"
    hint = f"download {spec.url} elsewhere and pass --input PATH"
    try:
        _resolve(urlparse(spec.url).hostname or "", timeout)
        with urllib.request.urlopen(spec.url, timeout=timeout) as r, open(part, "wb") as out:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {spec.name}",
                      file=sys.stderr, disable=None if progress else True) as bar:
                while block := r.read(BLOCK_SIZE):
                    out.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:  # the network works; the server refused this address
        _remove(part)
        answer = f"{spec.url} answered HTTP {e.code} ({e.reason})"
        raise DataError(f"cannot download {spec.name}: {answer}; {hint}") from None
    except (urllib.error.URLError, OSError) as e:
        _remove(part)
        reason = getattr(e, "reason", None) or e
        raise DataError(f"cannot download {spec.name}: network unavailable or refused ({reason}); {hint}") from None
    except BaseException:
        _remove(part)
        raise
    try:
        src = open_corpus(spec, part)
        algo, want = spec.checksum
        got = member_digest(src, algo)
        if got != want:
            raise DataError(f"downloaded {spec.url} fails its {algo} check ({got} != {want}); {hint}")
    except BaseException:
        _remove(part)
        raise
    os.replace(part, dest)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
