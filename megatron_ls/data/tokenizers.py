"""Tokenizers: bytes (enwik8, any corpus), text8's 27 symbols, sentencepiece.

Every tokenizer has ``encode``, ``decode``, ``vocab_size`` and ``describe()``; the description
(a small dict stored in the JSON beside the shards) rebuilds it through ``build_tokenizer``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from megatron_ls.errors import DataError

TEXT8_ALPHABET = " abcdefghijklmnopqrstuvwxyz"


class ByteTokenizer:
    """One token per byte, ids 0..255; text is encoded as UTF-8."""

    vocab_size = 256
    dtype = np.uint8

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).copy()

    def decode_bytes(self, ids: Iterable[int] | np.ndarray) -> bytes:
        return np.asarray(ids, dtype=np.int64).astype(np.uint8).tobytes()

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        # A model may sample a byte sequence that is not valid UTF-8; show it, do not fail.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"type": "byte", "vocab_size": self.vocab_size}


class Text8Tokenizer:
    """text8's alphabet: id 0 is the space, ids 1..26 are 'a'..'z' (alphabetical order).

    Any other character is an error: text8 contains only these 27 symbols.
    """

    vocab_size = 27
    dtype = np.uint8
    alphabet = TEXT8_ALPHABET
    _alphabet_bytes = TEXT8_ALPHABET.encode("ascii")
    # bytes.translate tables: byte -> id, applied after the alphabet check.
    _to_id = bytes(TEXT8_ALPHABET.index(chr(b)) if chr(b) in TEXT8_ALPHABET else 0 for b in range(256))
    _valid = np.zeros(256, dtype=bool)
    _valid[list(_alphabet_bytes)] = True

    def encode_block(self, block: bytes, offset: int = 0) -> bytes:
        """Map raw text8 bytes to ids (as bytes, one per symbol); ``offset`` only for errors."""
        if block.translate(None, self._alphabet_bytes):
            arr = np.frombuffer(block, dtype=np.uint8)
            pos = int(np.flatnonzero(~self._valid[arr])[0])
            raise DataError(
                f"byte 0x{arr[pos]:02x} ({chr(arr[pos])!r}) at offset {offset + pos:,} is outside "
                f"text8's alphabet (a-z and space)"
            )
        return block.translate(self._to_id)

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("latin-1", errors="replace") if isinstance(text, str) else bytes(text)
        if isinstance(text, str) and any(ord(c) > 255 for c in text):
            bad = next(i for i, c in enumerate(text) if ord(c) > 255)
            raise DataError(f"character {text[bad]!r} at offset {bad:,} is outside text8's alphabet")
        return np.frombuffer(self.encode_block(data), dtype=np.uint8).copy()

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise DataError(f"text8 ids must be in 0..26, got {int(arr.min())}..{int(arr.max())}")
        return "".join(self.alphabet[i] for i in arr.tolist())

    def describe(self) -> dict:
        return {"type": "text8", "vocab_size": self.vocab_size, "alphabet": self.alphabet}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class SentencePieceTokenizer:
    """A trained sentencepiece model (.model file)."""

    def __init__(self, model_path: str) -> None:
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise DataError(f"sentencepiece model not found: {model_path}")
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"cannot load sentencepiece model {model_path}: {e}") from None
        self.vocab_size = int(self._sp.GetPieceSize())
        self.dtype = np.uint16 if self.vocab_size <= 2**16 else np.int32

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.Encode(text, out_type=int), dtype=np.int64)

    def encode_many(self, texts: Sequence[str], num_threads: int = 1) -> np.ndarray:
        """Encode pieces of one stream and concatenate them (``num_threads`` encoder threads)."""
        if not texts:
            return np.empty(0, dtype=np.int64)
        out = self._sp.Encode(list(texts), out_type=int, num_threads=max(num_threads, 1))
        return np.fromiter((i for ids in out for i in ids), dtype=np.int64)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self._sp.Decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def describe(self, relative_to: str | None = None) -> dict:
        path = self.model_path
        if relative_to is not None:
            path = os.path.relpath(os.path.abspath(path), os.path.abspath(relative_to))
        return {
            "type": "sentencepiece",
            "vocab_size": self.vocab_size,
            "model": path,
            "model_sha256": _sha256(self.model_path),
        }


def train_sentencepiece(
    files: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "unigram",
    num_threads: int = 1,
    input_sentence_size: int = 2_000_000,
) -> str:
    """Train a sentencepiece model on text files; returns the path of ``model_prefix.model``.

    Settings chosen so that decode(encode(text)) == text: identity normalisation, no dummy
    prefix, whitespace kept, and byte fallback for characters the model has not seen (so
    ``vocab_size`` must leave room for the 256 byte pieces plus the special ones).

    The training runs in a child process: the C++ call holds the interpreter for as long as it
    trains, and Ctrl-C or SIGTERM must stop this process at once. When one arrives the child is
    killed and the exception goes on (the caller removes what the child wrote).
    """
    if vocab_size < 256 + 4:
        raise DataError(f"--vocab-size {vocab_size} too small: byte fallback needs at least 260")
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_train_child, daemon=True, name="sentencepiece-training",
                        args=(writer, os.getpid(), list(files), model_prefix, vocab_size, model_type,
                              num_threads, input_sentence_size))
    try:
        child.start()
        writer.close()
        child.join()  # a signal's exception comes out of here at once
        error = reader.recv() if reader.poll() else f"the training process ended with exit code {child.exitcode}"
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        reader.close()
        writer.close()
    if error is not None:
        raise DataError(f"sentencepiece training failed: {error}")
    return model_prefix + ".model"


def _train_child(conn, parent_pid: int, files: list[str], model_prefix: str, vocab_size: int, model_type: str,
                 num_threads: int, input_sentence_size: int) -> None:
    """The child of train_sentencepiece: sends None when done, else the first line of the error. It dies with
    its parent (on Linux): a parent killed by SIGKILL leaves no orphan training on."""
    import signal

    from megatron_ls.tool_signals import die_with_parent, signal_hook

    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent handles it
    if signal_hook("sp_train", os.getppid()):  # test hook: the parent is signalled during a long training
        import time

        time.sleep(60)
    try:
        _train_here(files, model_prefix, vocab_size, model_type, num_threads, input_sentence_size)
        conn.send(None)
    except Exception as e:  # noqa: BLE001 - whatever it is, the parent reports it in one line
        conn.send(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _train_here(files: Sequence[str], model_prefix: str, vocab_size: int, model_type: str, num_threads: int,
                input_sentence_size: int) -> None:
    import sentencepiece as spm

    from .text_pieces import MAX_PIECE_CHARS, iter_text_pieces

    def sentences() -> Iterator[str]:
        # Our own pieces, not sentencepiece's line reader: it drops lines over max_sentence_length,
        # which would leave nothing of a file without newlines.
        for path in files:
            for pieces, _ in iter_text_pieces(path):
                for piece in pieces:
                    if piece := piece.rstrip("\r\n"):
                        yield piece

    spm.SentencePieceTrainer.Train(
        sentence_iterator=sentences(),
        max_sentence_length=4 * MAX_PIECE_CHARS,
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=0.9995,  # rarer characters go through byte fallback
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        hard_vocab_limit=False,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=max(num_threads, 1),
        minloglevel=2,
    )

Tokenizer = ByteTokenizer | Text8Tokenizer | SentencePieceTokenizer


def tokenizer_mismatch(a: dict | None, b: dict | None) -> str | None:
    """How two tokenizer descriptions (``describe()``) differ, as "A vs B" with a's side first; None when they
    agree, or when either is unknown (None, empty, not a dict): then there is nothing to compare.

    Compared: the type, then for sentencepiece the model file's SHA-256 (two models of the same size give
    the same vocabulary size but different ids), then the vocabulary size. Not the model path: the same
    model may be stored anywhere.
    """
    if not isinstance(a, dict) or not isinstance(b, dict) or not a or not b:
        return None
    if a.get("type") != b.get("type"):
        return f"{a.get('type')} vs {b.get('type')}"
    if a.get("type") == "sentencepiece":
        ha, hb = a.get("model_sha256"), b.get("model_sha256")
        if ha and hb and ha != hb:
            return f"sentencepiece model sha256 {str(ha)[:12]}... vs {str(hb)[:12]}..."
    va, vb = a.get("vocab_size"), b.get("vocab_size")
    if va is not None and vb is not None and va != vb:
        return f"{a.get('type')} of {va} tokens vs {vb}"
    return None


def build_tokenizer(description: dict, base_dir: str | None = None) -> Tokenizer:
    """Rebuild a tokenizer from ``describe()``; relative model paths resolve from ``base_dir``."""
    kind = description.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "text8":
        return Text8Tokenizer()
    if kind == "sentencepiece":
        path = description["model"]
        if base_dir is not None and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        tok = SentencePieceTokenizer(path)
        want = description.get("model_sha256")
        if want and _sha256(path) != want:
            raise DataError(f"sentencepiece model {path} differs from the one the shards were built with")
        return tok
    raise DataError(f"unknown tokenizer type {kind!r} (expected byte, text8 or sentencepiece)")
