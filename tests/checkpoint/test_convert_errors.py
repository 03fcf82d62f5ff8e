"""Conversion round trips through every layout writer and the bad inputs: one clear message, non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from model_dirs import make_model_dir
from repo_paths import REPO_ROOT as ROOT
from safetensors.torch import load_file

from megatron_ls.cli.convert_checkpoint import main


@pytest.fixture()
def model_dir(tmp_path) -> str:
    return make_model_dir(str(tmp_path / "model"), vocab=27)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("tp,pp", [(2, 2), (2, 1), (1, 2)])
def test_round_trip_through_training_layouts(model_dir, tmp_path, tp, pp):
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    assert main(["--load", model_dir, "--output", ckpt, "--target-tp", str(tp), "--target-pp", str(pp)]) == 0
    assert main(["--load", ckpt, "--output", back]) == 0
    a, b = load_file(os.path.join(model_dir, "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(os.path.join(back, "tokenizer.json")))["type"] == "text8"


def test_folder_without_latest(tmp_path):
    (tmp_path / "run").mkdir()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "--load",
                          str(tmp_path / "run"), "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.startswith("error:") and "latest" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_shard(model_dir, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    assert main(["--load", model_dir, "--output", ckpt, "--target-tp", "2", "--target-pp", "2"]) == 0
    tag = os.path.join(ckpt, open(os.path.join(ckpt, "latest")).read().strip())
    os.remove(os.path.join(tag, "layer_01-model_01-model_states.pt"))
    capsys.readouterr()
    assert main(["--load", ckpt, "--output", str(tmp_path / "out")]) == 1
    assert "layer_01-model_01-model_states.pt is missing" in _error(capsys)
    os.remove(os.path.join(tag, "manifest.json"))  # without a manifest the reader notices it too
    assert main(["--load", ckpt, "--output", str(tmp_path / "out")]) == 1
    assert "layer_01-model_01-model_states.pt is missing" in _error(capsys)


def test_config_that_does_not_match_the_weights(model_dir, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    assert main(["--load", model_dir, "--output", ckpt, "--target-tp", "1", "--target-pp", "1"]) == 0
    tag = os.path.join(ckpt, open(os.path.join(ckpt, "latest")).read().strip())
    os.remove(os.path.join(tag, "manifest.json"))
    info = json.load(open(os.path.join(tag, "run_state.json")))
    info["model"]["ffn_hidden_size"] = 128
    json.dump(info, open(os.path.join(tag, "run_state.json"), "w"))
    capsys.readouterr()
    assert main(["--load", ckpt, "--output", str(tmp_path / "out")]) == 1
    assert "mlp.fc1.weight" in _error(capsys)


def test_refuses_to_overwrite_and_bad_target(model_dir, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    assert main(["--load", model_dir, "--output", ckpt, "--target-tp", "1"]) == 0
    capsys.readouterr()
    assert main(["--load", model_dir, "--output", ckpt, "--target-tp", "1"]) == 1
    assert "--overwrite" in _error(capsys)
    assert main(["--load", model_dir, "--output", str(tmp_path / "x"), "--target-tp", "3"]) == 1
    assert "divide" in _error(capsys)
    assert main(["--load", model_dir, "--output", str(tmp_path / "y"), "--target-pp", "5"]) == 1
    assert "num_layers" in _error(capsys)


def test_bad_target_degree_is_refused_before_anything_is_read(model_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    for flags in (["--target-tp", "0"], ["--target-pp", "0"], ["--target-tp", "-1"]):
        assert main(["--load", model_dir, "--output", out, *flags]) == 1
        assert "must be positive" in _error(capsys)
    assert not os.path.exists(out)


def test_overwrite_replaces_the_whole_tag(model_dir, tmp_path, capsys):
    """A TP=2 x PP=2 layout overwritten by a TP=1 one: no file of the old layout survives, none is partial."""
    ckpt = str(tmp_path / "ckpt")
    assert main(["--load", model_dir, "--output", ckpt, "--target-tp", "2", "--target-pp", "2"]) == 0
    assert main(["--load", model_dir, "--output", ckpt, "--target-tp", "1", "--overwrite"]) == 0
    tag = open(os.path.join(ckpt, "latest")).read().strip()
    assert sorted(os.listdir(ckpt)) == sorted(["latest", tag])
    files = sorted(os.listdir(os.path.join(ckpt, tag)))
    assert files == ["manifest.json", "mp_rank_00_model_states.pt", "run_state.json"]
    assert sorted(json.load(open(os.path.join(ckpt, tag, "manifest.json")))["files"]) == files[1:]


def test_consolidated_writer_leaves_nothing_on_a_missing_sentencepiece_model(tmp_path):
    from megatron_ls.checkpoint.consolidated import is_consolidated, save_consolidated
    from megatron_ls.errors import CheckpointError
    from megatron_ls.model import TransformerLSConfig, TransformerLSLM

    config = TransformerLSConfig(vocab_size=300, num_layers=1, hidden_size=32, num_attention_heads=2,
                                 ffn_hidden_size=64, window_size=16, chunk_size=8, dropout=0.0)
    out = str(tmp_path / "out")
    tokenizer = {"type": "sentencepiece", "vocab_size": 300, "model": "gone.model"}
    with pytest.raises(CheckpointError, match="gone.model"):
        save_consolidated(out, TransformerLSLM(config).state_dict(), config, tokenizer, str(tmp_path))
    assert not is_consolidated(out) and not (os.path.isdir(out) and os.listdir(out))


def test_corrupt_manifest(model_dir, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    assert main(["--load", model_dir, "--output", ckpt, "--target-tp", "1"]) == 0
    tag = os.path.join(ckpt, open(os.path.join(ckpt, "latest")).read().strip())
    with open(os.path.join(tag, "manifest.json"), "w") as f:
        f.write("{not json")
    capsys.readouterr()
    assert main(["--load", ckpt, "--output", str(tmp_path / "out")]) == 1
    assert "manifest.json is not a valid manifest" in _error(capsys)


def test_flipped_bytes_fail_the_crc_check(model_dir, tmp_path, capsys):
    """Same-size damage (the manifest's sizes all agree) is found by the CRC-32, by convert and by load_model."""
    from megatron_ls.errors import CheckpointError
    from megatron_ls.inference.model_source import load_model

    ckpt = str(tmp_path / "ckpt")
    assert main(["--load", model_dir, "--output", ckpt, "--target-tp", "1"]) == 0
    shard = os.path.join(ckpt, open(os.path.join(ckpt, "latest")).read().strip(), "mp_rank_00_model_states.pt")
    raw = bytearray(open(shard, "rb").read())
    at = raw.find(load_file(os.path.join(model_dir, "model.safetensors"))["embedding.weight"].numpy().tobytes())
    assert at > 0
    raw[at + 100: at + 104] = bytes(b ^ 0xFF for b in raw[at + 100: at + 104])  # weights only: torch.load reads it
    open(shard, "wb").write(bytes(raw))
    capsys.readouterr()
    out = str(tmp_path / "out")
    assert main(["--load", ckpt, "--output", out]) == 1
    assert "mp_rank_00_model_states.pt fails its CRC-32 check" in _error(capsys)
    assert not os.path.exists(out)
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):  # generate.py and evaluate.py
        load_model(ckpt)


@pytest.mark.parametrize("where", ["a-file", "under-a-file", "proc", "sys"])
@pytest.mark.parametrize("target", [[], ["--target-tp", "1"]])
def test_unusable_output_is_one_line_before_any_reading(model_dir, tmp_path, capsys, monkeypatch, where, target):
    import megatron_ls.checkpoint.source as source

    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    output = {"a-file": str(blocker), "under-a-file": str(blocker / "sub"), "proc": "/proc/convert-test-out",
              "sys": "/sys/convert-test-out"}[where]
    if where in ("proc", "sys") and not os.path.isdir(os.path.dirname(output)):
        pytest.skip(f"no {os.path.dirname(output)} here")
    ckpt = str(tmp_path / "ckpt")
    assert main(["--load", model_dir, "--output", ckpt, "--target-tp", "1"]) == 0
    capsys.readouterr()

    def no_reading(*args):
        raise AssertionError("--output must be checked before the checkpoint is read")

    monkeypatch.setattr(source, "read_weights", no_reading)
    assert main(["--load", ckpt, "--output", output, *target]) == 1
    err = _error(capsys)
    assert len(err.strip().splitlines()) == 1 and f"cannot write --output {output}" in err, err
    assert blocker.read_text() == "keep me"
