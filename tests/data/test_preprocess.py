"""tools/preprocess_data.py: exact splits, every output format detail, and every bad input."""

import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import replace

import numpy as np
import pytest
from repo_paths import REPO_ROOT

from megatron_ls.cli.preprocess_data import main
from megatron_ls.data import MMapIndexedDataset, SentencePieceTokenizer, build_tokenizer, default_corpus_text
from megatron_ls.data import corpora as corpora_mod

REPO = REPO_ROOT
TOOL = os.path.join(REPO, "tools", "preprocess_data.py")


def run_main(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def run_tool(*argv, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the wrapper must find the package itself
    return subprocess.run([sys.executable, TOOL, *argv], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)


def assert_clean_failure(rc, err, must_say, out_dir, before=()):
    assert rc not in (0, None), "bad input must exit non-zero"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"want one line on stderr, got: {err!r}"
    assert "Traceback" not in err
    assert must_say in lines[0], lines[0]
    left = sorted(set(os.listdir(out_dir)) - set(before)) if os.path.isdir(out_dir) else []
    assert left == [], f"partial outputs left behind: {left}"


def read_split(prefix, split):
    ds = MMapIndexedDataset(f"{prefix}_{split}")
    return bytes(np.asarray(ds.tokens))


def make_zip(path, member, data, method=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", method, compresslevel=1 if method == zipfile.ZIP_DEFLATED else None) as z:
        z.writestr(member, data)


@pytest.fixture
def small_corpora(monkeypatch):
    """enwik8/text8 specs scaled down (same code paths, sizes of a few MB)."""
    for name in ("enwik8", "text8"):
        spec = corpora_mod.CORPORA[name]
        monkeypatch.setitem(corpora_mod.CORPORA, name, replace(spec, size=3_000_000,
                                                               split=(2_700_000, 150_000, 150_000)))


def test_enwik8_zip_real_split_exact_bytes(tmp_path, capsys):
    """The real 100,000,000-byte layout and 90M/5M/5M split, from a zip made here."""
    data = np.random.default_rng(8).integers(0, 256, 100_000_000, dtype=np.uint8).tobytes()
    zpath = tmp_path / "enwik8.zip"
    make_zip(zpath, "enwik8", data)
    prefix = str(tmp_path / "out" / "enwik8")
    # The tool as its own process, started by a small Python that reports the tool's peak resident memory. (Not
    # straight from here: Linux carries the pre-exec RSS of a fork of this large test process into ru_maxrss.)
    starter = ("import resource, subprocess, sys\n"
               "r = subprocess.run(sys.argv[1:])\n"
               "sys.stderr.write(f'PEAK_RSS_KIB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n')\n"
               "sys.exit(r.returncode)\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", starter, sys.executable, TOOL, "--dataset", "enwik8", "--input",
                           str(zpath), "--output-prefix", prefix], capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t0
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err
    peak_mib = int(err.split("PEAK_RSS_KIB ")[1].split()[0]) / 1024  # Linux reports KiB
    # About 45 MiB measured (Python + numpy + 1 MiB blocks); holding the 100 MB input whole would exceed this bound.
    assert peak_mib < 128, f"preprocessing enwik8 peaked at {peak_mib:.0f} MiB of resident memory"
    assert read_split(prefix, "train") == data[:90_000_000]
    assert read_split(prefix, "valid") == data[90_000_000:95_000_000]
    assert read_split(prefix, "test") == data[95_000_000:]
    meta = json.load(open(prefix + ".json"))
    assert meta["vocab_size"] == 256 and meta["tokenizer"] == {"type": "byte", "vocab_size": 256}
    assert [meta["splits"][s]["tokens"] for s in ("train", "valid", "test")] == [90_000_000, 5_000_000, 5_000_000]
    ds = MMapIndexedDataset(prefix + "_train")
    assert ds.dtype == np.uint8 and list(ds.sizes) == [90_000_000] and list(ds.doc_idx) == [0, 1]
    assert "90,000,000 tokens" in out and "MB/s" in out
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        f"enwik8{s}" for s in ["_train.bin", "_train.idx", "_valid.bin", "_valid.idx", "_test.bin", "_test.idx",
                               ".json"])
    assert took < 20, f"100 MB took {took:.1f} s"


@pytest.mark.parametrize("as_zip", [True, False])
def test_text8_split_and_alphabet(tmp_path, capsys, small_corpora, as_zip):
    rng = np.random.default_rng(27)
    data = np.frombuffer(b" abcdefghijklmnopqrstuvwxyz", np.uint8)[rng.integers(0, 27, 3_000_000)].tobytes()
    if as_zip:
        src = tmp_path / "text8.zip"
        make_zip(src, "text8", data)
    else:
        src = tmp_path / "text8"
        src.write_bytes(data)
    prefix = str(tmp_path / "t8")
    rc, out, err = run_main(["--dataset", "text8", "--input", str(src), "--output-prefix", prefix], capsys)
    assert rc == 0, err
    tok = build_tokenizer(json.load(open(prefix + ".json"))["tokenizer"])
    assert tok.vocab_size == 27
    parts = [read_split(prefix, s) for s in ("train", "valid", "test")]
    assert [len(p) for p in parts] == [2_700_000, 150_000, 150_000]
    assert max(b"".join(parts)) == 26
    assert tok.decode(np.frombuffer(b"".join(parts), np.uint8)) == data.decode()


def test_text_files_byte_split_and_documents(tmp_path, capsys):
    files = []
    blobs = [os.urandom(5000), b"second file\n" * 300, os.urandom(1234)]
    for i, blob in enumerate(blobs):
        files.append(tmp_path / f"f{i}.txt")
        files[-1].write_bytes(blob)
    prefix = str(tmp_path / "o" / "txt")
    rc, out, err = run_main(["--dataset", "text", "--input", *map(str, files), "--output-prefix", prefix,
                             "--split", "8,1,1"], capsys)
    assert rc == 0, err
    whole = b"".join(blobs)
    n = len(whole)
    assert read_split(prefix, "train") == whole[: round(n * 0.8)]
    assert read_split(prefix, "valid") == whole[round(n * 0.8) : round(n * 0.9)]
    assert read_split(prefix, "test") == whole[round(n * 0.9) :]
    # One document per file; a file cut by a split boundary continues as a document of the next split
    # (train: f0 + start of f1, valid: rest of f1 + start of f2, test: rest of f2).
    assert [MMapIndexedDataset(f"{prefix}_{s}").num_documents for s in ("train", "valid", "test")] == [2, 2, 1]


def test_text_sentencepiece_trained_by_the_tool(tmp_path, capsys):
    text = default_corpus_text()[:150_000]
    src = tmp_path / "doc.txt"
    src.write_text(text, encoding="utf-8")
    prefix = str(tmp_path / "sp" / "doc")
    rc, out, err = run_main(["--dataset", "text", "--input", str(src), "--output-prefix", prefix,
                             "--tokenizer", "sentencepiece", "--vocab-size", "400", "--workers", "2"], capsys)
    assert rc == 0, err
    meta = json.load(open(prefix + ".json"))
    assert meta["tokenizer"]["model"] == "doc.model" and os.path.exists(prefix + ".model")
    tok = build_tokenizer(meta["tokenizer"], base_dir=str(tmp_path / "sp"))
    ids = np.concatenate([np.asarray(MMapIndexedDataset(f"{prefix}_{s}").tokens) for s in ("train", "valid", "test")])
    assert MMapIndexedDataset(prefix + "_train").dtype == np.uint16
    assert tok.decode(ids) == text
    # Reusing the trained model through --sentencepiece-model gives the same tokens.
    prefix2 = str(tmp_path / "sp2" / "doc")
    rc, _, err = run_main(["--dataset", "text", "--input", str(src), "--output-prefix", prefix2,
                           "--tokenizer", "sentencepiece", "--sentencepiece-model", prefix + ".model"], capsys)
    assert rc == 0, err
    assert read_split(prefix2, "train") == read_split(prefix, "train")
    assert isinstance(build_tokenizer(json.load(open(prefix2 + ".json"))["tokenizer"],
                                      base_dir=str(tmp_path / "sp2")), SentencePieceTokenizer)


def test_default_corpus_quickstart(tmp_path, capsys):
    prefix = str(tmp_path / "d" / "pydoc")
    rc, out, err = run_main(["--dataset", "default", "--output-prefix", prefix], capsys)
    assert rc == 0, err
    whole = default_corpus_text().encode("utf-8")
    assert b"".join(read_split(prefix, s) for s in ("train", "valid", "test")) == whole
    for word in ("train", "valid", "test", "vocab 256", "MB/s"):
        assert word in out


# ----------------------------------------------------------------------------- bad inputs


def test_missing_input_file_via_tool(tmp_path):
    r = run_tool("--dataset", "enwik8", "--input", str(tmp_path / "nope.zip"), "--output-prefix",
                 str(tmp_path / "e"), cwd=str(tmp_path))
    assert_clean_failure(r.returncode, r.stderr, "not found", tmp_path)


def test_existing_prefix_refused_via_tool(tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(b"x" * 1000)
    sentinel = tmp_path / "p_valid.idx"
    sentinel.write_bytes(b"keep me")
    before = os.listdir(tmp_path)
    r = run_tool("--dataset", "text", "--input", str(src), "--output-prefix", str(tmp_path / "p"))
    assert_clean_failure(r.returncode, r.stderr, "--overwrite", tmp_path, before)
    assert sentinel.read_bytes() == b"keep me"
    r = run_tool("--dataset", "text", "--input", str(src), "--output-prefix", str(tmp_path / "p"), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert len(MMapIndexedDataset(str(tmp_path / "p_valid"))) == 1


def test_zip_without_member(tmp_path, capsys):
    z = tmp_path / "enwik8.zip"
    make_zip(z, "something_else", b"abc")
    before = os.listdir(tmp_path)
    rc, _, err = run_main(["--dataset", "enwik8", "--input", str(z), "--output-prefix", str(tmp_path / "e")], capsys)
    assert_clean_failure(rc, err, "no member 'enwik8'", tmp_path, before)


@pytest.mark.parametrize("as_zip", [True, False])
def test_wrong_size(tmp_path, capsys, as_zip):
    if as_zip:
        src = tmp_path / "text8.zip"
        make_zip(src, "text8", b"abc def" * 1000)
    else:
        src = tmp_path / "text8"
        src.write_bytes(b"abc def" * 1000)
    before = os.listdir(tmp_path)
    rc, _, err = run_main(["--dataset", "text8", "--input", str(src), "--output-prefix", str(tmp_path / "t")], capsys)
    assert_clean_failure(rc, err, "must be 100,000,000 bytes", tmp_path, before)


def test_symbols_outside_text8_alphabet(tmp_path, capsys, small_corpora):
    data = bytearray(b"the quick brown fox " * 150_000)
    data[2_800_123] = ord("X")  # in the valid split: train is already (temporarily) written by then
    src = tmp_path / "text8.zip"
    make_zip(src, "text8", bytes(data))
    before = os.listdir(tmp_path)
    rc, _, err = run_main(["--dataset", "text8", "--input", str(src), "--output-prefix", str(tmp_path / "t")], capsys)
    assert_clean_failure(rc, err, "offset 2,800,123 is outside text8's alphabet", tmp_path, before)


def test_unwritable_directory(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_bytes(b"y" * 100)
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"")
    before = os.listdir(tmp_path)
    # A path through a regular file cannot be created, even by root.
    rc, _, err = run_main(["--dataset", "text", "--input", str(src), "--output-prefix", str(blocker / "sub" / "p")],
                          capsys)
    assert_clean_failure(rc, err, "cannot create output directory", tmp_path, before)


def test_read_only_directory(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_bytes(b"y" * 100)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permission bits do not stop writes")
        rc, _, err = run_main(["--dataset", "text", "--input", str(src), "--output-prefix", str(ro / "p")], capsys)
        assert_clean_failure(rc, err, "cannot write", ro)
    finally:
        ro.chmod(0o755)


def test_corrupt_zip(tmp_path, capsys, small_corpora):
    data = np.random.default_rng(3).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    src = tmp_path / "enwik8.zip"
    make_zip(src, "enwik8", data, method=zipfile.ZIP_STORED)
    raw = bytearray(src.read_bytes())
    raw[2_000_000] ^= 0xFF  # CRC no longer matches
    src.write_bytes(bytes(raw))
    before = os.listdir(tmp_path)
    rc, _, err = run_main(["--dataset", "enwik8", "--input", str(src), "--output-prefix", str(tmp_path / "e")], capsys)
    assert_clean_failure(rc, err, "corrupt", tmp_path, before)


def test_download_without_network_fails_fast(tmp_path, capsys):
    t0 = time.perf_counter()
    rc, _, err = run_main(["--dataset", "enwik8", "--download", "--output-prefix", str(tmp_path / "e")], capsys)
    assert time.perf_counter() - t0 < 30
    if rc == 0:
        pytest.skip("this machine has network access")
    assert_clean_failure(rc, err, "cannot download enwik8", tmp_path)


@pytest.fixture
def loopback_server(tmp_path):
    """A local HTTP server for --download: serves the files of tmp_path/www."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the server's request log would share the tool's stderr
            pass

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("case", ["ok", "bad-checksum", "not-found"])
def test_download_checks_the_checksum(tmp_path, capsys, monkeypatch, small_corpora, loopback_server, case):
    """--download from a (loopback) server: the checksum is verified; a failure leaves no zip and no shards."""
    import hashlib

    www, base = loopback_server
    data = np.random.default_rng(11).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    make_zip(www / "enwik8.zip", "enwik8", data)
    digest = hashlib.md5(data).hexdigest() if case != "bad-checksum" else "0" * 32
    url = f"{base}/{'missing' if case == 'not-found' else 'enwik8'}.zip"
    monkeypatch.setitem(corpora_mod.CORPORA, "enwik8",
                        replace(corpora_mod.CORPORA["enwik8"], url=url, checksum=("md5", digest)))
    out = tmp_path / "out"
    out.mkdir()
    prefix = str(out / "enwik8")
    rc, _, err = run_main(["--dataset", "enwik8", "--download", "--output-prefix", prefix, "--no-progress"], capsys)
    if case == "ok":
        assert rc == 0, err
        assert (out / "enwik8.zip").read_bytes() == (www / "enwik8.zip").read_bytes()  # kept beside the shards
        assert read_split(prefix, "train") + read_split(prefix, "valid") + read_split(prefix, "test") == data
    else:
        must_say = "fails its md5 check" if case == "bad-checksum" else "cannot download enwik8: "
        if case == "not-found":
            assert "answered HTTP 404" in err
        assert_clean_failure(rc, err, must_say, out)


@pytest.mark.parametrize(
    "argv, must_say",
    [
        (["--dataset", "enwik8", "--output-prefix", "x"], "needs --input"),
        (["--dataset", "text", "--input", "a", "--output-prefix", "x", "--split", "1,2"], "three"),
        (["--dataset", "enwik8", "--input", "a", "--output-prefix", "x", "--split", "1,1,1"], "fixed"),
        (["--dataset", "text", "--input", "a", "--output-prefix", "x", "--tokenizer", "sentencepiece"],
         "exactly one of"),
    ],
)
def test_bad_arguments_one_line(tmp_path, capsys, monkeypatch, argv, must_say):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").write_bytes(b"abc")
    rc, _, err = run_main(argv, capsys)
    assert_clean_failure(rc, err, must_say, tmp_path, before=["a"])


def test_not_utf8_for_sentencepiece(tmp_path, capsys):
    src = tmp_path / "bin.dat"
    src.write_bytes(b"ok text\n\xff\xfe broken")
    model = tmp_path / "m"
    from megatron_ls.data import train_sentencepiece

    corpus = tmp_path / "c.txt"
    corpus.write_text(default_corpus_text()[:50_000])
    train_sentencepiece([str(corpus)], str(model), 400)
    before = os.listdir(tmp_path)
    rc, _, err = run_main(["--dataset", "text", "--input", str(src), "--output-prefix", str(tmp_path / "o"),
                           "--tokenizer", "sentencepiece", "--sentencepiece-model", str(model) + ".model"], capsys)
    assert_clean_failure(rc, err, "not UTF-8", tmp_path, before)


def test_sentencepiece_trains_on_a_file_without_newlines(tmp_path, capsys):
    """text8-like input (one long line): trained from bounded pieces, still lossless."""
    rng = np.random.default_rng(5)
    words = ["".join(chr(c) for c in rng.integers(97, 123, rng.integers(1, 8))) for _ in range(300)]
    text = " ".join(words[i] for i in rng.integers(0, 300, 40_000))
    src = tmp_path / "one_line.txt"
    src.write_text(text)
    prefix = str(tmp_path / "o" / "ol")
    rc, _, err = run_main(["--dataset", "text", "--input", str(src), "--output-prefix", prefix,
                           "--tokenizer", "sentencepiece", "--vocab-size", "350"], capsys)
    assert rc == 0, err
    tok = build_tokenizer(json.load(open(prefix + ".json"))["tokenizer"], base_dir=str(tmp_path / "o"))
    ids = np.concatenate([np.asarray(MMapIndexedDataset(f"{prefix}_{s}").tokens) for s in ("train", "valid", "test")])
    assert tok.decode(ids) == text
    assert len(ids) < 0.8 * len(text)  # it learned multi-character pieces


def test_not_utf8_while_training_sentencepiece(tmp_path, capsys):
    src = tmp_path / "bin.dat"
    src.write_bytes(b"ok text\n\xff\xfe broken")
    before = os.listdir(tmp_path)
    rc, _, err = run_main(["--dataset", "text", "--input", str(src), "--output-prefix", str(tmp_path / "o"),
                           "--tokenizer", "sentencepiece", "--vocab-size", "300"], capsys)
    assert_clean_failure(rc, err, "not UTF-8", tmp_path, before)


@pytest.mark.parametrize("split", ["nan,1,1", "inf,1,1", "1,-inf,1", "1e308,1e308,1"])
def test_split_weights_must_be_finite(tmp_path, capsys, monkeypatch, split):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").write_bytes(b"abc")
    rc, _, err = run_main(["--dataset", "text", "--input", "a", "--output-prefix", "new/x", "--split", split], capsys)
    assert_clean_failure(rc, err, "finite", tmp_path, before=["a"])
    from megatron_ls.data import DataError, split_bounds

    with pytest.raises(DataError, match="finite"):
        split_bounds(100, [float(w) for w in split.split(",")])


@pytest.mark.parametrize("case", ["not-utf8-spm", "vocab-size", "text8-symbol", "corrupt-zip", "download"])
def test_failed_run_removes_the_folders_it_created(tmp_path, capsys, small_corpora, case):
    """A failure leaves no empty output folder of the run's own making; a folder that was there stays."""
    src = tmp_path / "in.txt"
    src.write_bytes(b"ok text\n\xff\xfe broken" if case == "not-utf8-spm" else b"some text " * 50)
    if case == "text8-symbol":
        src.write_bytes(b"a" * 2_999_999 + b"X")
    elif case == "corrupt-zip":
        make_zip(tmp_path / "text8.zip", "text8", b"a" * 3_000_000, method=zipfile.ZIP_STORED)
        raw = bytearray((tmp_path / "text8.zip").read_bytes())
        raw[2_000_000] ^= 0xFF
        src = tmp_path / "text8.zip"
        src.write_bytes(bytes(raw))
    spm = ["--dataset", "text", "--input", str(src), "--tokenizer", "sentencepiece", "--vocab-size"]
    argv = {
        "not-utf8-spm": [*spm, "300"],
        "vocab-size": [*spm, "-5"],
        "text8-symbol": ["--dataset", "text8", "--input", str(src)],
        "corrupt-zip": ["--dataset", "text8", "--input", str(src)],
        "download": ["--dataset", "text8", "--download"],
    }[case]
    before = os.listdir(tmp_path)
    rc, _, err = run_main([*argv, "--output-prefix", str(tmp_path / "new" / "deeper" / "p"), "--no-progress"], capsys)
    if case == "download" and rc == 0:
        pytest.skip("this machine has network access")
    assert_clean_failure(rc, err, "", tmp_path, before)
    (tmp_path / "kept").mkdir()
    rc, _, err = run_main([*argv, "--output-prefix", str(tmp_path / "kept" / "p"), "--no-progress"], capsys)
    assert rc == 1 and (tmp_path / "kept").is_dir() and os.listdir(tmp_path / "kept") == []
