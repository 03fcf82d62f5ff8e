"""Megatron's MMapIndexedDataset format (.bin + .idx), byte-compatible both ways.

Layout of ``P.idx`` (all little-endian), as in Megatron-LM / Megatron-DeepSpeed:

    9 bytes  b"MMIDIDX\\x00\\x00"
    <Q       version (1)
    <B       dtype code of the tokens in .bin (see ``DTYPE_CODES``)
    <Q       S, the sequence count
    <Q       D, the length of the document index (documents + 1: it starts with 0)
    int32[S] sequence lengths in tokens
    int64[S] byte offset of each sequence in .bin
    int64[D] document index: sequence numbers where documents start, then the total S

``P.bin`` is the raw tokens of all sequences back to back. The reader maps both files with
np.memmap and never reads a whole file; the writer streams tokens in and only renames its
temporary files to the final names at the end, so a failure never leaves a partial shard.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

import numpy as np

from megatron_ls.errors import DataError

from ..temp_files import temp_name

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D: 34 bytes

DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
# Sequence lengths are int32 on disk; longer runs of tokens are cut into several sequences.
MAX_SEQUENCE_LENGTH = 2**31 - 1


class IndexedDatasetError(DataError):
    """A .bin/.idx pair that is missing, malformed or inconsistent."""


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def dtype_code(dtype: np.dtype | type) -> int:
    try:
        return _CODE_OF[np.dtype(dtype)]
    except KeyError:
        raise IndexedDatasetError(f"dtype {np.dtype(dtype)} has no MMapIndexedDataset code") from None


def best_dtype(vocab_size: int) -> type[np.generic]:
    """Smallest unsigned/int dtype holding ids 0 .. vocab_size-1."""
    if vocab_size <= 2**8:
        return np.uint8
    if vocab_size <= 2**16:
        return np.uint16
    return np.int32


def exists(prefix: str) -> bool:
    return os.path.exists(index_file_path(prefix)) and os.path.exists(data_file_path(prefix))


class MMapIndexedDatasetBuilder:
    """Streams tokens into ``prefix.bin`` / ``prefix.idx`` under temporary names.

    ``add_tokens`` appends to the open sequence (so a 90M-token split can be fed in blocks),
    ``end_sequence`` closes it, ``add_item`` is Megatron's one-call form, ``end_document``
    closes a document. ``finalize()`` writes the index and renames both files into place;
    ``finalize(commit=False)`` + ``commit()`` lets a caller rename several shards together.
    Used as a context manager, an exception aborts and removes the temporary files.
    """

    def __init__(self, prefix: str, dtype: np.dtype | type = np.uint8) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self._final = [data_file_path(prefix), index_file_path(prefix)]
        self._tmp = [temp_name(p) for p in self._final]
        self._sizes: list[int] = []
        self._doc_idx: list[int] = [0]
        self._open_len = 0  # tokens in the sequence being written
        self._state = "open"
        self._bin = open(self._tmp[0], "wb")  # closed in finalize/abort

    @property
    def num_tokens(self) -> int:
        return sum(self._sizes) + self._open_len

    @property
    def num_sequences(self) -> int:
        return len(self._sizes)

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    def add_tokens(self, tokens: np.ndarray | bytes | memoryview) -> None:
        if self._state != "open":
            raise IndexedDatasetError(f"builder for {self.prefix} is already {self._state}")
        arr = self._as_array(tokens)
        start = 0
        while start < arr.size:
            take = min(arr.size - start, MAX_SEQUENCE_LENGTH - self._open_len)
            self._bin.write(memoryview(arr[start : start + take]).cast("B"))
            self._open_len += take
            start += take
            if self._open_len == MAX_SEQUENCE_LENGTH:
                self.end_sequence()

    def end_sequence(self) -> None:
        if self._open_len:
            self._sizes.append(self._open_len)
            self._open_len = 0

    def add_item(self, tokens: np.ndarray | bytes | memoryview) -> None:
        """Megatron's name: append one whole sequence (an empty one too, as Megatron does)."""
        arr = self._as_array(tokens)
        if arr.size == 0 and self._open_len == 0:
            self._sizes.append(0)
        else:
            self.add_tokens(arr)
            self.end_sequence()

    def end_document(self) -> None:
        self.end_sequence()
        if len(self._sizes) > self._doc_idx[-1]:
            self._doc_idx.append(len(self._sizes))

    def finalize(self, commit: bool = True) -> None:
        if self._state != "open":
            raise IndexedDatasetError(f"builder for {self.prefix} is already {self._state}")
        try:
            self.end_document()
            self._bin.close()
            self._write_index(self._tmp[1])
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"
        if commit:
            self.commit()

    def commit(self) -> None:
        """Rename the finished temporary files to their final names."""
        if self._state != "finalized":
            raise IndexedDatasetError(f"builder for {self.prefix} must be finalized before commit")
        for tmp, final in zip(self._tmp, self._final):
            os.replace(tmp, final)
        self._state = "committed"

    def abort(self) -> None:
        """Drop everything written so far (temporary files only; final names are untouched)."""
        if self._state == "committed":
            return
        self._bin.close()
        for tmp in self._tmp:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
        self._state = "aborted"

    def __enter__(self) -> MMapIndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.finalize()

    def _as_array(self, tokens: np.ndarray | bytes | memoryview) -> np.ndarray:
        if isinstance(tokens, (bytes, bytearray, memoryview)):
            if self.dtype != np.uint8:
                raise IndexedDatasetError(f"raw bytes given to a {self.dtype} builder")
            return np.frombuffer(tokens, dtype=np.uint8)
        arr = np.asarray(tokens).reshape(-1)
        if arr.dtype != self.dtype:
            if arr.size and np.issubdtype(self.dtype, np.integer):
                info = np.iinfo(self.dtype)
                lo, hi = int(arr.min()), int(arr.max())
                if lo < info.min or hi > info.max:
                    raise IndexedDatasetError(
                        f"token ids {lo}..{hi} do not fit the shard dtype {self.dtype}"
                    )
            arr = arr.astype(self.dtype)
        return np.ascontiguousarray(arr)

    def _write_index(self, path: str) -> None:
        sizes = np.asarray(self._sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        doc_idx = np.asarray(self._doc_idx, dtype=np.int64)
        with open(path, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(sizes), len(doc_idx)))
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))


def write_indexed_dataset(
    prefix: str, sequences: Iterable[np.ndarray], dtype: np.dtype | type, documents: bool = True
) -> None:
    """Write each array as one sequence (and, if ``documents``, one document)."""
    with MMapIndexedDatasetBuilder(prefix, dtype) as builder:
        for seq in sequences:
            builder.add_item(seq)
            if documents:
                builder.end_document()


class MMapIndexedDataset:
    """Read-only view of ``prefix.bin`` / ``prefix.idx`` through np.memmap.

    ``ds[i]`` is sequence i, ``ds.get(i, offset, length)`` a part of it, ``ds.tokens`` the whole
    .bin as one flat array (what the stream datasets read), ``sizes`` / ``pointers`` /
    ``doc_idx`` the index arrays (memory-mapped, not copied).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"indexed dataset file not found: {path}")
        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size or not head.startswith(MAGIC):
            raise IndexedDatasetError(f"{idx_path} is not an MMapIndexedDataset index (bad magic)")
        _, version, code, seq_count, doc_count = _HEADER.unpack(head)
        if version != VERSION:
            raise IndexedDatasetError(f"{idx_path}: unsupported index version {version} (expected 1)")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + 12 * seq_count + 8 * doc_count
        if idx_size != expected:
            raise IndexedDatasetError(
                f"{idx_path}: {idx_size} bytes but the header ({seq_count} sequences, "
                f"{doc_count} document entries) implies {expected}"
            )
        self._idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        off = _HEADER.size
        self.sizes = np.frombuffer(self._idx, dtype=np.int32, count=seq_count, offset=off)
        off += 4 * seq_count
        self.pointers = np.frombuffer(self._idx, dtype=np.int64, count=seq_count, offset=off)
        off += 8 * seq_count
        self.doc_idx = np.frombuffer(self._idx, dtype=np.int64, count=doc_count, offset=off)
        if doc_count and self.doc_idx[0] != 0:
            raise IndexedDatasetError(f"{idx_path}: document index must start with 0")

        bin_size = os.path.getsize(bin_path)
        want = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if seq_count else 0
        if bin_size != want:
            raise IndexedDatasetError(
                f"{bin_path}: {bin_size} bytes but the index describes {want} bytes of {self.dtype} tokens"
            )
        # np.memmap cannot map an empty file.
        if bin_size:
            self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r")
        else:
            self.tokens = np.empty(0, dtype=self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return max(len(self.doc_idx) - 1, 0)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset .. offset+length`` of sequence ``idx`` (a memmap view)."""
        size = int(self.sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"range {offset}..{offset + length} outside sequence {idx} of {size} tokens")
        start = int(self.pointers[idx]) // self.dtype.itemsize + offset
        return self.tokens[start : start + length]

    def __getitem__(self, idx: int) -> np.ndarray:
        if not isinstance(idx, (int, np.integer)):
            raise TypeError("index a sequence by integer; use .tokens for flat slices")
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range ({len(self)} sequences)")
        return self.get(idx)
