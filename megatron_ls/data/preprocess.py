"""Corpora to shards: the work behind tools/preprocess_data.py, callable from Python.

Byte-level inputs never pass through Python objects per token: each block read from the file
or the zip is written to the shard as is (text8 goes through one ``bytes.translate``), so the
speed is that of inflating the zip. Sentencepiece inputs are encoded once into a scratch token
file (the split needs the total token count), then cut into the three splits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

import megatron_ls
from megatron_ls.errors import DataError

from ..temp_files import temp_dir
from .corpora import BLOCK_SIZE, CorpusSpec, InputFile, open_corpus, split_bounds
from .default_corpus import default_corpus_source, write_default_corpus
from .shards import ShardSet
from .text_pieces import iter_text_pieces
from .tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Text8Tokenizer,
    train_sentencepiece,
)

PROGRESS_MIN_BYTES = 32 << 20  # below this a bar is noise


@dataclass
class PreprocessResult:
    prefix: str
    meta: dict
    input_bytes: int
    seconds: float


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    show = progress and total >= PROGRESS_MIN_BYTES
    # disable=None: tqdm also stays quiet when stderr is not a terminal.
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                disable=None if show else True, leave=False)


def _meta(dataset: str, tokenizer: dict, inputs: list[str], input_bytes: int, weights) -> dict:
    return {
        "dataset": dataset,
        "tokenizer": tokenizer,
        "vocab_size": tokenizer["vocab_size"],
        "source": {"inputs": inputs, "bytes": input_bytes, "split": list(weights)},
        "created_by": f"megatron_ls {megatron_ls.__version__}",
    }


def preprocess_corpus(
    spec: CorpusSpec, input_path: str, prefix: str, overwrite: bool = False, progress: bool = True
) -> PreprocessResult:
    """enwik8 / text8 (zip or raw file) to shards with the corpus's fixed split."""
    t0 = time.perf_counter()
    src = open_corpus(spec, input_path)
    tok = Text8Tokenizer() if spec.tokenizer == "text8" else ByteTokenizer()
    bounds, edge = [], 0
    for n in spec.split:
        bounds.append((edge, edge + n))
        edge += n
    with ShardSet(prefix, np.uint8, overwrite) as shards:
        shards.set_bounds(bounds)
        offset = 0
        with _bar(src.size, spec.name, progress) as bar:
            for block in src.blocks():
                shards.write(tok.encode_block(block, offset) if spec.tokenizer == "text8" else block)
                offset += len(block)
                bar.update(len(block))
        meta = shards.commit(_meta(spec.name, tok.describe(), [os.path.basename(input_path)], src.size,
                                   spec.split))
    return PreprocessResult(prefix, meta, src.size, time.perf_counter() - t0)


def _is_stream(path: str) -> bool:
    try:
        return not stat.S_ISREG(os.stat(path).st_mode) and not stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False  # missing: InputFile names it


@contextlib.contextmanager
def _as_regular_files(files: Sequence[str], prefix: str) -> Iterator[list[str]]:
    """Pipes among the inputs (``--input <(cat a.txt)``) copied into a scratch folder beside the output, read as
    they come: the split needs the total size before the first byte is written, and sentencepiece reads its
    input twice. Regular files are used in place."""
    if not any(_is_stream(p) for p in files):
        yield list(files)
        return
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with temp_dir(prefix + ".input") as tmp:  # named for this host and process: a later run removes it if killed
        out = []
        for i, path in enumerate(files):
            if _is_stream(path):
                copy = os.path.join(tmp, str(i))
                with open(path, "rb") as src, open(copy, "wb") as dst:
                    shutil.copyfileobj(src, dst, BLOCK_SIZE)
                path = copy
            out.append(path)
        yield out


def preprocess_text(
    files: Sequence[str],
    prefix: str,
    tokenizer: str = "byte",
    sentencepiece_model: str | None = None,
    vocab_size: int | None = None,
    split: Sequence[float] = (90, 5, 5),
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = True,
    dataset: str = "text",
    source: str | None = None,
) -> PreprocessResult:
    """Any text files (pipes too), concatenated in the given order (one document each), split by weights."""
    if not files:
        raise DataError("no input files given (--input FILE ...)")
    names = [source] if source else [os.path.basename(p) for p in files]
    with _as_regular_files(files, prefix) as paths:
        return _preprocess_text(paths, names, prefix, tokenizer, sentencepiece_model, vocab_size, split, overwrite,
                                workers, progress, dataset)


def _preprocess_text(files: Sequence[str], names: list[str], prefix: str, tokenizer: str,
                     sentencepiece_model: str | None, vocab_size: int | None, split: Sequence[float], overwrite: bool,
                     workers: int, progress: bool, dataset: str) -> PreprocessResult:
    t0 = time.perf_counter()
    inputs = [InputFile(p) for p in files]
    total_bytes = sum(s.size for s in inputs)
    if total_bytes == 0:
        raise DataError("the input files are empty")

    if tokenizer == "byte":
        tok = ByteTokenizer()
        with ShardSet(prefix, np.uint8, overwrite) as shards:
            shards.set_bounds(split_bounds(total_bytes, split))
            with _bar(total_bytes, dataset, progress) as bar:
                for src in inputs:
                    for block in src.blocks():
                        shards.write(block)
                        bar.update(len(block))
                    shards.end_document()
            meta = shards.commit(_meta(dataset, tok.describe(), names, total_bytes, split))
        return PreprocessResult(prefix, meta, total_bytes, time.perf_counter() - t0)

    if tokenizer != "sentencepiece":
        raise DataError(f"unknown tokenizer {tokenizer!r} (byte or sentencepiece)")
    if (sentencepiece_model is None) == (vocab_size is None):
        raise DataError("sentencepiece needs exactly one of --sentencepiece-model M or --vocab-size V (to train)")
    model_final = prefix + ".model"
    extras = (model_final, prefix + ".vocab") if sentencepiece_model is None else ()
    if sentencepiece_model is not None:
        tok = SentencePieceTokenizer(sentencepiece_model)  # load before writing anything
    with ShardSet(prefix, np.int32, overwrite, extra_outputs=extras) as probe:
        probe.abort()  # only the existence / writability checks; the dtype is known later
    if sentencepiece_model is None:
        with temp_dir(prefix + ".sp") as tmp:  # named for this host and process: a later run removes it if killed
            trained = train_sentencepiece(files, os.path.join(tmp, "spm"), vocab_size, num_threads=workers)
            with ShardSet(prefix, SentencePieceTokenizer(trained).dtype, overwrite, extras) as shards:
                model_tmp = shards.temp_path(".model")
                vocab_tmp = shards.temp_path(".vocab")
                os.replace(trained, model_tmp)
                os.replace(os.path.join(tmp, "spm.vocab"), vocab_tmp)
                shards.add_extra(model_tmp, model_final)
                shards.add_extra(vocab_tmp, prefix + ".vocab")
                # Described by its final name, relative to the JSON, so the shard folder can move.
                tok = SentencePieceTokenizer(model_tmp)
                desc = tok.describe()
                desc["model"] = os.path.basename(model_final)
                meta = _encode_into(shards, tok, desc, inputs, names, total_bytes, split, workers, progress,
                                    dataset)
    else:
        with ShardSet(prefix, tok.dtype, overwrite) as shards:
            desc = tok.describe(relative_to=os.path.dirname(os.path.abspath(prefix)))
            meta = _encode_into(shards, tok, desc, inputs, names, total_bytes, split, workers, progress, dataset)
    return PreprocessResult(prefix, meta, total_bytes, time.perf_counter() - t0)


def _encode_into(shards: ShardSet, tok: SentencePieceTokenizer, desc: dict, inputs: list[InputFile],
                 names: list[str], total_bytes: int, split: Sequence[float], workers: int, progress: bool,
                 dataset: str) -> dict:
    scratch = shards.temp_path(".tokens")
    ends = []  # token offset where each input file ends: the documents
    count = 0
    with open(scratch, "wb") as out, _bar(total_bytes, dataset, progress) as bar:
        for src in inputs:
            for pieces, nbytes in iter_text_pieces(src.path):
                ids = tok.encode_many(pieces, num_threads=workers).astype(shards.dtype)
                out.write(ids.tobytes())
                count += len(ids)
                bar.update(nbytes)
            ends.append(count)
    shards.set_bounds(split_bounds(count, split))
    if count:
        tokens = np.memmap(scratch, dtype=shards.dtype, mode="r")
        start = 0
        for end in ends:
            for a in range(start, end, BLOCK_SIZE):
                shards.write(np.asarray(tokens[a : min(a + BLOCK_SIZE, end)]))
            shards.end_document()
            start = end
        del tokens
    return shards.commit(_meta(dataset, desc, names, total_bytes, split))


def preprocess_default(prefix: str, overwrite: bool = False, progress: bool = True) -> PreprocessResult:
    """The embedded pydoc corpus, byte-level, split 90/5/5."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pydoc_topics.txt")
        write_default_corpus(path)
        return preprocess_text([path], prefix, "byte", split=(90, 5, 5), overwrite=overwrite,
                               progress=progress, dataset="default", source=default_corpus_source())
