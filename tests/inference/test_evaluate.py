"""tools/evaluate.py: BPC by the paper's protocol equals an independent token-by-token computation; training
checkpoints are accepted directly; bad protocol settings are one clear error."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from model_dirs import make_model_dir

from megatron_ls.checkpoint.consolidated import load_consolidated
from megatron_ls.cli.convert_checkpoint import main as convert_main
from megatron_ls.cli.evaluate import main as evaluate_main
from megatron_ls.cli.preprocess_data import main as preprocess_main
from megatron_ls.data.lanes import load_split
from megatron_ls.inference.context import ContextRule
from megatron_ls.inference.decoder import IncrementalDecoder

CONTEXT, STEP = 96, 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    text = root / "corpus.txt"
    words = ("long short transformer landmark window chunk memory segment byte level model " * 60).split()
    text.write_text(" ".join(words[i * 7 % len(words)] for i in range(len(words))))
    prefix = str(root / "shards" / "corpus")
    assert preprocess_main(["--dataset", "text", "--input", str(text), "--output-prefix", prefix,
                            "--split", "2,1,2", "--no-progress"]) == 0
    return make_model_dir(str(root / "model")), prefix, root


def reference_bpc(model_dir: str, prefix: str) -> tuple[float, int]:
    """Every target predicted once by the incremental decoder under the same segment/memory rule."""
    model, _ = load_consolidated(model_dir)
    tokens = torch.from_numpy(load_split(prefix, "test")[0].astype("int64"))
    dec = IncrementalDecoder(model, ContextRule(STEP, CONTEXT - STEP))
    bits = 0.0
    for i in range(len(tokens) - 1):
        logp = torch.log_softmax(dec.step(tokens[i: i + 1]).double(), dim=-1)
        bits -= float(logp[0, tokens[i + 1]]) / math.log(2)
    return bits / (len(tokens) - 1), len(tokens) - 1


def test_bpc_matches_token_by_token_and_writes_json(setup, tmp_path, capsys):
    model_dir, prefix, _ = setup
    out = tmp_path / "bpc.json"
    assert evaluate_main(["--model", model_dir, "--data-path", prefix, "--split", "test", "--context", str(CONTEXT),
                          "--step", str(STEP), "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    want, n = reference_bpc(model_dir, prefix)
    assert result["tokens"] == n and n % STEP != 0  # the short, padded last step is counted too
    assert abs(result["bpc"] - want) < 1e-6
    assert f"{result['bpc']:.4f}" in printed


def test_training_checkpoint_directly_and_bad_protocol(setup, tmp_path, capsys):
    model_dir, prefix, _ = setup
    ckpt = str(tmp_path / "ckpt")
    assert convert_main(["--load", model_dir, "--output", ckpt, "--target-tp", "2", "--target-pp", "2"]) == 0
    args = ["--data-path", prefix, "--context", str(CONTEXT), "--step", str(STEP), "--no-progress"]
    assert evaluate_main(["--model", model_dir, *args, "--output", str(tmp_path / "a.json")]) == 0
    assert evaluate_main(["--model", ckpt, *args, "--output", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text())["bpc"] for f in ("a.json", "b.json"))
    assert abs(a - b) < 1e-6
    capsys.readouterr()
    assert evaluate_main(["--model", model_dir, "--data-path", prefix, "--context", "100", "--step", "32"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--context" in err
    assert evaluate_main(["--model", model_dir, "--data-path", str(tmp_path / "nothing")]) == 1
    assert capsys.readouterr().err.startswith("error:")


@pytest.mark.parametrize("case", ["device", "cuda-index", "output-is-dir", "output-under-file"])
def test_bad_device_or_output_is_one_clear_error(setup, tmp_path, capsys, case):
    model_dir, prefix, _ = setup
    args = ["--model", model_dir, "--data-path", prefix, "--context", str(CONTEXT), "--step", str(STEP),
            "--no-progress"]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    extra, want = {
        "device": (["--device", "gpu0"], "device 'gpu0' cannot be used"),
        "cuda-index": (["--device", f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"],
                       "cannot be used"),
        "output-is-dir": (["--output", str(tmp_path)], "it is a directory"),
        "output-under-file": (["--output", str(blocker / "bpc.json")], "cannot write --output"),
    }[case]
    assert evaluate_main(args + extra) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and want in lines[0], captured.err
    assert "bits per character" not in captured.out  # output problems are found before the evaluation


@pytest.mark.parametrize("max_tokens", ["-5", "0", "1"])
def test_max_tokens_below_two_names_the_flag(setup, capsys, max_tokens):
    model_dir, prefix, _ = setup
    assert evaluate_main(["--model", model_dir, "--data-path", prefix, "--context", str(CONTEXT), "--step", str(STEP),
                          "--no-progress", "--max-tokens", max_tokens]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --max-tokens must be at least 2") and max_tokens in lines[0]
    assert "bits per character" not in captured.out


@pytest.mark.parametrize("folder", ["/proc", "/sys"])
def test_output_that_os_access_allows_to_root_is_refused_up_front(setup, capsys, folder):
    """As root os.access says yes to /proc and /sys; the check tries a scratch file instead."""
    if not os.path.isdir(folder):
        pytest.skip(f"no {folder} here")
    model_dir, prefix, _ = setup
    assert evaluate_main(["--model", model_dir, "--data-path", prefix, "--context", str(CONTEXT), "--step", str(STEP),
                          "--no-progress", "--output", f"{folder}/evaluate-test.json"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write --output {folder}/"), captured.err
    assert "bits per character" not in captured.out


def test_output_check_leaves_nothing_behind(setup, tmp_path, capsys):
    """The check creates no folder: a run that fails later leaves none; a run that succeeds creates it."""
    model_dir, prefix, _ = setup
    out = tmp_path / "new" / "sub" / "bpc.json"
    args = ["--model", model_dir, "--data-path", prefix, "--step", str(STEP), "--no-progress", "--output", str(out)]
    assert evaluate_main([*args, "--context", "100"]) == 1  # fails after the output check
    assert "--context" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    assert evaluate_main([*args, "--context", str(CONTEXT), "--max-tokens", "40"]) == 0
    assert json.loads(out.read_text())["tokens"] == 39


def test_shards_of_another_sentencepiece_model_are_refused(tmp_path, capsys):
    """Same vocabulary size, other sentencepiece model (its hash in P.json): the ids mean other text."""
    from megatron_ls.data import SentencePieceTokenizer, train_sentencepiece

    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(f"word{i % 37} piece{i % 11}" for i in range(3000)))
    tok = SentencePieceTokenizer(train_sentencepiece([str(corpus)], str(tmp_path / "m"), 300))
    prefix = str(tmp_path / "shards" / "sp")
    assert preprocess_main(["--dataset", "text", "--input", str(corpus), "--output-prefix", prefix,
                            "--tokenizer", "sentencepiece", "--sentencepiece-model", tok.model_path,
                            "--no-progress"]) == 0
    model_dir = make_model_dir(str(tmp_path / "model"), vocab=tok.vocab_size, tokenizer=tok)
    args = ["--model", model_dir, "--data-path", prefix, "--context", str(CONTEXT), "--step", str(STEP),
            "--max-tokens", "40", "--no-progress"]
    assert evaluate_main(args) == 0
    meta = json.loads(open(prefix + ".json").read())
    meta["tokenizer"]["model_sha256"] = "0123456789ab" + "0" * 52  # as if made by another 300-piece model
    open(prefix + ".json", "w").write(json.dumps(meta))
    capsys.readouterr()
    assert evaluate_main(args) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "another tokenizer" in lines[0] and "0123456789ab" in lines[0], captured.err
    assert "bits per character" not in captured.out
