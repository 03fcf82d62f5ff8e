"""The output of preprocessing: ``P_train`` / ``P_valid`` / ``P_test`` shards plus ``P.json``.

``ShardSet`` routes one token stream into the three splits (contiguous, in order) and makes the
set appear all at once: everything is written under temporary names and renamed only when every
file is complete, so an error or Ctrl-C leaves no partial shard, and SIGINT / SIGTERM wait for the
renames (an overwrite never mixes two sets). An existing output is refused
before anything is written unless ``overwrite``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from megatron_ls.errors import DataError

from ..temp_files import sweep, temp_name
from ..tool_signals import signal_hook, uninterruptible
from .corpora import SPLIT_NAMES
from .indexed_dataset import MMapIndexedDatasetBuilder, data_file_path, index_file_path

META_FORMAT = "megatron-ls-shards-1"
# Scratch outputs beside the shards, P.SUFFIX under a temporary name (".sp": the sentencepiece training folder).
SCRATCH_SUFFIXES = (".tokens", ".model", ".vocab", ".sp", ".input")


def split_prefix(prefix: str, split: str) -> str:
    return f"{prefix}_{split}"


def meta_path(prefix: str) -> str:
    """The JSON beside the shards: ``P.json``."""
    return prefix + ".json"


def output_paths(prefix: str) -> list[str]:
    paths = []
    for split in SPLIT_NAMES:
        paths += [data_file_path(split_prefix(prefix, split)), index_file_path(split_prefix(prefix, split))]
    return paths + [meta_path(prefix)]


def read_meta(prefix: str) -> dict:
    path = meta_path(prefix)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(f"shard metadata not found: {path} (run tools/preprocess_data.py first)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not shard metadata (a JSON object)")
    if meta.get("format") != META_FORMAT:
        raise DataError(f"{path}: unknown shard metadata format {meta.get('format')!r}")
    return meta


class ShardSet:
    def __init__(
        self, prefix: str, dtype: np.dtype | type, overwrite: bool = False, extra_outputs: tuple[str, ...] = ()
    ) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        finals = output_paths(prefix) + list(extra_outputs)
        if not overwrite:
            existing = [p for p in finals if os.path.exists(p)]
            if existing:
                raise DataError(f"output {existing[0]} already exists; pass --overwrite to replace it")
        out_dir = os.path.dirname(os.path.abspath(prefix))
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise DataError(f"cannot create output directory {out_dir}: a file of that name exists")
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create output directory {out_dir}: {e.strerror}") from None
        sweep(finals + [prefix + s for s in SCRATCH_SUFFIXES])  # what killed runs left under temporary names
        self._extras: list[tuple[str, str]] = []  # (temporary, final) moved in at commit
        self._temps: list[str] = []  # scratch files removed at the end either way
        self.builders: list[MMapIndexedDatasetBuilder] = []
        try:
            for split in SPLIT_NAMES:
                self.builders.append(MMapIndexedDatasetBuilder(split_prefix(prefix, split), self.dtype))
        except OSError as e:
            self.abort()
            raise DataError(f"cannot write to {out_dir}: {e.strerror}") from None
        self.bounds: list[tuple[int, int]] | None = None
        self.pos = 0
        self._cur = 0
        self._committed = False

    def temp_path(self, suffix: str) -> str:
        """A scratch file beside the outputs, removed when the set commits or aborts."""
        path = temp_name(self.prefix + suffix)
        self._temps.append(path)
        return path

    def add_extra(self, tmp: str, final: str) -> None:
        """Another output (e.g. a trained tokenizer model) renamed into place at commit."""
        self._extras.append((tmp, final))

    def set_bounds(self, bounds: list[tuple[int, int]]) -> None:
        self.bounds = bounds

    def write(self, tokens: np.ndarray | bytes | memoryview) -> None:
        """Append the next tokens of the stream; they land in whichever split they belong to."""
        assert self.bounds is not None, "set_bounds first"
        arr = np.frombuffer(tokens, dtype=np.uint8) if not isinstance(tokens, np.ndarray) else tokens
        i, n = 0, len(arr)
        while i < n:
            while self._cur < 3 and self.pos >= self.bounds[self._cur][1]:
                self.builders[self._cur].end_document()
                self._cur += 1
            if self._cur == 3:
                raise DataError(f"more tokens than the split expects ({self.bounds[-1][1]:,})")
            take = min(n - i, self.bounds[self._cur][1] - self.pos)
            self.builders[self._cur].add_tokens(arr[i : i + take])
            i += take
            self.pos += take

    def end_document(self) -> None:
        if self._cur < 3:
            self.builders[self._cur].end_document()

    def commit(self, meta: dict) -> dict:
        """Finish every file, write ``P.json`` and rename the whole set into place."""
        assert self.bounds is not None, "set_bounds first"
        if self.pos != self.bounds[-1][1]:
            raise DataError(f"stream ended after {self.pos:,} tokens, expected {self.bounds[-1][1]:,}")
        splits = {}
        for split, builder, (a, b) in zip(SPLIT_NAMES, self.builders, self.bounds):
            builder.finalize(commit=False)
            splits[split] = {
                "prefix": os.path.basename(split_prefix(self.prefix, split)),
                "tokens": b - a,
                "sequences": builder.num_sequences,
                "documents": builder.num_documents,
            }
        meta = {"format": META_FORMAT, **meta, "dtype": self.dtype.name, "splits": splits}
        tmp_meta = self.temp_path(".json")
        with open(tmp_meta, "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        with uninterruptible():  # SIGINT / SIGTERM wait: the old set or the new one, never a mix
            for i, builder in enumerate(self.builders):
                builder.commit()
                if i == 0:
                    signal_hook("publish")  # test hook: a signal between two renames
            for tmp, final in self._extras:
                os.replace(tmp, final)
            os.replace(tmp_meta, meta_path(self.prefix))
            self._committed = True
        self._cleanup()
        return meta

    def abort(self) -> None:
        for builder in self.builders:
            builder.abort()
        for tmp, _ in self._extras:
            _remove(tmp)
        self._cleanup()

    def _cleanup(self) -> None:
        for path in self._temps:
            _remove(path)

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._committed:
            self._cleanup()  # the scratch files, also when a signal held back by commit() ends the run there
        else:
            self.abort()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
