"""Round trip of every tokenizer, and rebuilding each from its description."""

import numpy as np
import pytest

from megatron_ls.data import (
    ByteTokenizer,
    DataError,
    SentencePieceTokenizer,
    Text8Tokenizer,
    build_tokenizer,
    default_corpus_text,
    train_sentencepiece,
)

SAMPLES = [
    "",
    "hello world",
    "Tabs\tand  double  spaces,\nnewlines\n\n and trailing space ",
    "ünïcødé, 日本語, emoji 🙂, math ∑x²",
    "<page><title>enwik8</title> [[link|text]] &amp; {{template}}</page>\n",
]


def test_byte_round_trip():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    for s in SAMPLES:
        ids = tok.encode(s)
        assert ids.dtype == np.uint8 and len(ids) == len(s.encode("utf-8"))
        assert tok.decode(ids) == s
    raw = bytes(range(256)) * 3
    assert tok.decode_bytes(tok.encode(raw)) == raw  # any bytes, not only UTF-8


def test_text8_round_trip_and_mapping():
    tok = Text8Tokenizer()
    assert tok.vocab_size == 27
    assert list(tok.encode(" az")) == [0, 1, 26]
    text = "anarchism originated as a term of abuse first used against early working class radicals "
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text.encode())) == text
    every = Text8Tokenizer.alphabet
    assert tok.decode(range(27)) == every and list(tok.encode(every)) == list(range(27))


@pytest.mark.parametrize("bad, offset", [("abc1", 3), ("Hello", 0), ("ok\nno", 2), ("caf\u00e9", 3), ("x\u4e2d", 1)])
def test_text8_rejects_other_symbols(bad, offset):
    with pytest.raises(DataError, match=f"at offset {offset}"):
        Text8Tokenizer().encode(bad)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text(default_corpus_text()[:300_000], encoding="utf-8")
    return train_sentencepiece([str(corpus)], str(d / "m"), vocab_size=400)


def test_sentencepiece_round_trip(spm_model):
    tok = SentencePieceTokenizer(spm_model)
    assert 260 <= tok.vocab_size <= 400
    for s in SAMPLES + [default_corpus_text()[300_000:310_000]]:
        ids = tok.encode(s)
        assert ids.max(initial=0) < tok.vocab_size
        assert tok.decode(ids) == s
    # Encoding a stream in pieces with threads concatenates to the same text.
    text = default_corpus_text()[:20_000]
    pieces = text.splitlines(keepends=True)
    assert tok.decode(tok.encode_many(pieces, num_threads=2)) == text
    assert len(tok.encode("def function(argument):")) < len("def function(argument):")  # it learned pieces


def test_describe_rebuilds_every_tokenizer(spm_model, tmp_path):
    import os

    for tok in (ByteTokenizer(), Text8Tokenizer(), SentencePieceTokenizer(spm_model)):
        desc = tok.describe()
        again = build_tokenizer(desc)
        assert type(again) is type(tok) and again.vocab_size == tok.vocab_size == desc["vocab_size"]
        assert again.decode(again.encode("some text")) == "some text"
    # A relative model path resolves from the folder of the JSON.
    base = os.path.dirname(spm_model)
    desc = SentencePieceTokenizer(spm_model).describe(relative_to=base)
    assert not os.path.isabs(desc["model"])
    assert build_tokenizer(desc, base_dir=base).vocab_size == desc["vocab_size"]
    with pytest.raises(DataError, match="unknown tokenizer"):
        build_tokenizer({"type": "wordpiece"})
    changed = tmp_path / "other.model"
    changed.write_bytes(open(spm_model, "rb").read())
    with pytest.raises(DataError, match="differs"):
        build_tokenizer(dict(desc, model=str(changed), model_sha256="0" * 64))


def test_sentencepiece_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        SentencePieceTokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(DataError, match="too small"):
        train_sentencepiece([str(tmp_path / "x.txt")], str(tmp_path / "m"), vocab_size=100)


def test_tokenizer_mismatch(spm_model, tmp_path):
    from megatron_ls.data import tokenizer_mismatch

    sp = SentencePieceTokenizer(spm_model).describe()
    assert tokenizer_mismatch(sp, dict(sp, model="elsewhere/m.model")) is None  # the path does not matter
    assert tokenizer_mismatch(ByteTokenizer().describe(), ByteTokenizer().describe()) is None
    assert tokenizer_mismatch(None, sp) is None and tokenizer_mismatch(sp, {}) is None  # unknown: nothing to say
    assert tokenizer_mismatch(ByteTokenizer().describe(), Text8Tokenizer().describe()) == "byte vs text8"
    other = dict(sp, model_sha256="f" * 64)
    diff = tokenizer_mismatch(sp, other)
    assert diff is not None and sp["model_sha256"][:12] in diff and "ffffffffffff" in diff
    assert diff.index(sp["model_sha256"][:12]) < diff.index("ffffffffffff")  # a's side first
    assert "vs" in tokenizer_mismatch(dict(sp, model_sha256=None), dict(sp, model_sha256=None, vocab_size=1))
