"""MMapIndexedDataset conformance, both ways, against a reader and a writer written here from the spec."""

import os
import struct

import numpy as np
import pytest

from megatron_ls.data import indexed_dataset as idx_mod
from megatron_ls.data.indexed_dataset import IndexedDatasetError, MMapIndexedDataset, MMapIndexedDatasetBuilder

# The spec (DESIGN.md §3 / Megatron's indexed_dataset.py), restated independently of the code.
SPEC_CODES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"}


def spec_read(prefix):
    """Read a .idx/.bin pair with nothing but struct and the spec."""
    with open(prefix + ".idx", "rb") as f:
        raw = f.read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    (code,) = struct.unpack_from("<B", raw, 17)
    seq_count, doc_count = struct.unpack_from("<QQ", raw, 18)
    off = 34
    sizes = struct.unpack_from(f"<{seq_count}i", raw, off)
    off += 4 * seq_count
    pointers = struct.unpack_from(f"<{seq_count}q", raw, off)
    off += 8 * seq_count
    doc_idx = struct.unpack_from(f"<{doc_count}q", raw, off)
    off += 8 * doc_count
    assert off == len(raw), "trailing bytes in .idx"
    dtype = np.dtype(SPEC_CODES[code]).newbyteorder("<")
    with open(prefix + ".bin", "rb") as f:
        data = f.read()
    seqs = [np.frombuffer(data, dtype=dtype, count=s, offset=p) for s, p in zip(sizes, pointers)]
    return {"version": version, "dtype": np.dtype(SPEC_CODES[code]), "sizes": list(sizes),
            "pointers": list(pointers), "doc_idx": list(doc_idx), "seqs": seqs, "bin_len": len(data)}


def megatron_style_write(prefix, seqs, doc_ends, dtype):
    """What Megatron's MMapIndexedDatasetBuilder produces: add_item per sequence, end_document after
    the sequences numbered in ``doc_ends``, then finalize."""
    code = {v: k for k, v in SPEC_CODES.items()}[np.dtype(dtype).name]
    with open(prefix + ".bin", "wb") as f:
        for s in seqs:
            f.write(np.asarray(s, dtype=dtype).tobytes(order="C"))
    sizes = [len(s) for s in seqs]
    pointers, addr = [], 0
    for s in sizes:
        pointers.append(addr)
        addr += s * np.dtype(dtype).itemsize
    doc_idx = [0] + list(doc_ends)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(np.array(sizes, dtype=np.int32).tobytes(order="C"))
        f.write(np.array(pointers, dtype=np.int64).tobytes(order="C"))
        f.write(np.array(doc_idx, dtype=np.int64).tobytes(order="C"))


def _random_seqs(rng, dtype, n=7):
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    out = []
    for _ in range(n):
        size = int(rng.integers(0, 50))
        if info is not None:
            out.append(rng.integers(max(info.min, -1000), min(info.max, 60000), size=size).astype(dtype))
        else:
            out.append(rng.standard_normal(size).astype(dtype))
    return out


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float64, np.float32, np.uint16])
def test_our_writer_matches_spec_reader(tmp_path, dtype):
    rng = np.random.default_rng(0)
    seqs = _random_seqs(rng, dtype)
    prefix = str(tmp_path / "ours")
    with MMapIndexedDatasetBuilder(prefix, dtype) as b:
        for i, s in enumerate(seqs):
            # Stream the sequence in two pieces: must equal one add_item.
            b.add_tokens(s[: len(s) // 2])
            b.add_tokens(s[len(s) // 2 :])
            b.end_sequence()
            if i in (2, 5):
                b.end_document()
    got = spec_read(prefix)
    nonempty = [s for s in seqs if len(s)]  # an empty sequence is not a sequence
    assert got["version"] == 1
    assert got["dtype"] == np.dtype(dtype)
    assert got["sizes"] == [len(s) for s in nonempty]
    assert got["pointers"][0] == 0
    assert got["bin_len"] == sum(s.nbytes for s in nonempty)
    for a, b_ in zip(got["seqs"], nonempty):
        np.testing.assert_array_equal(a, b_)
    assert got["doc_idx"][0] == 0 and got["doc_idx"][-1] == len(nonempty)
    assert got["doc_idx"] == sorted(set(got["doc_idx"]))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.float32])
def test_our_reader_reads_megatron_style_file(tmp_path, dtype):
    rng = np.random.default_rng(1)
    seqs = _random_seqs(rng, dtype, n=9) + [np.array([], dtype=dtype), np.arange(5).astype(dtype)]
    doc_ends = [2, 3, 9, len(seqs)]
    prefix = str(tmp_path / "megatron")
    megatron_style_write(prefix, seqs, doc_ends, dtype)
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(seqs)
    assert list(ds.doc_idx) == [0] + doc_ends
    assert ds.num_documents == len(doc_ends)
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(ds[i], s)
    np.testing.assert_array_equal(ds.get(len(seqs) - 1, 1, 3), np.arange(1, 4).astype(dtype))
    np.testing.assert_array_equal(ds.tokens, np.concatenate(seqs))
    assert isinstance(ds.tokens, np.memmap)  # mapped, not loaded


def test_exact_bytes_of_a_known_file(tmp_path):
    prefix = str(tmp_path / "k")
    with MMapIndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_item(np.array([1, 2, 3]))
        b.add_item(np.array([65535]))
        b.add_item(np.array([], dtype=np.uint16))  # Megatron keeps empty items as 0-size sequences
        b.end_document()
        b.add_item(np.array([7, 8]))
    want_idx = (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 4, 3)
                + struct.pack("<4i", 3, 1, 0, 2) + struct.pack("<4q", 0, 6, 8, 8) + struct.pack("<3q", 0, 3, 4))
    assert open(prefix + ".idx", "rb").read() == want_idx
    assert open(prefix + ".bin", "rb").read() == struct.pack("<6H", 1, 2, 3, 65535, 7, 8)


def test_long_runs_are_cut_at_the_int32_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(idx_mod, "MAX_SEQUENCE_LENGTH", 10)
    prefix = str(tmp_path / "long")
    with MMapIndexedDatasetBuilder(prefix, np.uint8) as b:
        b.add_tokens(np.arange(15, dtype=np.uint8))
        b.add_tokens(np.arange(15, 27, dtype=np.uint8))
    got = spec_read(prefix)
    assert got["sizes"] == [10, 10, 7]
    np.testing.assert_array_equal(MMapIndexedDataset(prefix).tokens, np.arange(27))


def test_nothing_final_until_finalize_and_abort_cleans(tmp_path):
    prefix = str(tmp_path / "p")
    b = MMapIndexedDatasetBuilder(prefix, np.uint8)
    b.add_item(b"hello")
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    b.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError), MMapIndexedDatasetBuilder(prefix, np.uint8) as b2:
        b2.add_item(b"x")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_out_of_range_ids_refused(tmp_path):
    with pytest.raises(IndexedDatasetError, match="do not fit"), MMapIndexedDatasetBuilder(
        str(tmp_path / "o"), np.uint8
    ) as b:
        b.add_item(np.array([1, 256]))
    assert os.listdir(tmp_path) == []


def test_empty_dataset_round_trip(tmp_path):
    prefix = str(tmp_path / "e")
    MMapIndexedDatasetBuilder(prefix, np.uint8).finalize()
    ds = MMapIndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_tokens == 0 and list(ds.doc_idx) == [0]


def _write_small(prefix):
    megatron_style_write(prefix, [np.arange(10, dtype=np.int32)], [1], np.int32)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: _patch(p + ".idx", 0, b"NOTMAGIC!"), "bad magic"),
        (lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 2)), "version 2"),
        (lambda p: _patch(p + ".idx", 17, struct.pack("<B", 42)), "dtype code 42"),
        (lambda p: open(p + ".bin", "ab").write(b"\0\0\0\0"), "describes 40 bytes"),
        (lambda p: os.truncate(p + ".idx", 40), "implies"),
        (lambda p: os.remove(p + ".bin"), "not found"),
    ],
)
def test_reader_rejects_bad_files(tmp_path, corrupt, message):
    prefix = str(tmp_path / "bad")
    _write_small(prefix)
    corrupt(prefix)
    with pytest.raises(IndexedDatasetError, match=message):
        MMapIndexedDataset(prefix)


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
