"""Pipes as preprocessing inputs (data/preprocess.py): text spooled, zip refused."""

from __future__ import annotations

import os
import threading

import pytest

from megatron_ls.data.preprocess import preprocess_text
from megatron_ls.errors import DataError


# ---- pipes as inputs ------------------------------------------------------------------------------
def test_text_from_a_pipe_equals_the_file(tmp_path):
    text = b"the quick brown fox jumps over the lazy dog\n" * 300
    (tmp_path / "a.txt").write_bytes(text)
    fifo = str(tmp_path / "pipe")
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: open(fifo, "wb").write(text))
    writer.start()
    piped = preprocess_text([fifo], str(tmp_path / "out" / "p"), progress=False)
    writer.join()
    plain = preprocess_text([str(tmp_path / "a.txt")], str(tmp_path / "out" / "f"), progress=False)
    assert piped.input_bytes == plain.input_bytes == len(text)
    for split in ("train", "valid", "test"):
        assert (tmp_path / "out" / f"p_{split}.bin").read_bytes() == (tmp_path / "out" / f"f_{split}.bin").read_bytes()
    assert [n for n in os.listdir(tmp_path / "out") if ".tmp-" in n] == []  # the spooled copy is gone


def test_zip_from_a_pipe_is_refused_without_reading(tmp_path):
    from megatron_ls.data.corpora import CORPORA
    from megatron_ls.data.preprocess import preprocess_corpus

    fifo = str(tmp_path / "enwik8.zip")
    os.mkfifo(fifo)  # no writer: opening it would block forever
    with pytest.raises(DataError, match="is a pipe or a device, not a regular file: a zip is read by seeking"):
        preprocess_corpus(CORPORA["enwik8"], fifo, str(tmp_path / "e"), progress=False)
