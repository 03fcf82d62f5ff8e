"""tools/generate.py and the consolidated checkpoint: sampling, prompt sources, no DeepSpeed, bad inputs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from model_dirs import make_model_dir
from repo_paths import REPO_ROOT

from megatron_ls.checkpoint.consolidated import load_consolidated
from megatron_ls.cli.generate import main as generate_main
from megatron_ls.inference.generate import generate
from megatron_ls.inference.sampling import sample_next

ROOT = REPO_ROOT


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> str:
    return make_model_dir(str(tmp_path_factory.mktemp("byte_model")))


def test_greedy_generation_equals_full_forward_argmax(byte_model):
    model, _ = load_consolidated(byte_model)
    prompt = list(b"The long-short transformer ")
    out = generate(model, prompt, 40, temperature=0).tokens
    seq, c = list(prompt), model.config.chunk_size
    with torch.no_grad():
        for _ in range(40):
            x = torch.tensor([seq + [0] * (-len(seq) % c)])  # causal: padding after the last token changes nothing
            logits = torch.cat(_segments(model, x), dim=1)
            seq.append(int(logits[0, len(seq) - 1].argmax()))
    assert out == seq[len(prompt):]


def _segments(model, x):
    out, memory = [], None
    for s in range(0, x.shape[1], model.config.seq_length):
        logits, memory = model(x[:, s: s + model.config.seq_length], memory)
        out.append(logits)
    return out


def test_sampling_filters_and_seed():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5]])
    assert int(sample_next(logits, temperature=0)) == 1
    assert int(sample_next(logits, top_k=1, generator=torch.Generator().manual_seed(0))) == 1
    assert int(sample_next(logits, top_p=0.01, generator=torch.Generator().manual_seed(0))) == 1
    draws = {int(sample_next(logits, top_k=2, generator=torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {1, 3}
    a = [int(sample_next(logits, generator=torch.Generator().manual_seed(7))) for _ in range(5)]
    b = [int(sample_next(logits, generator=torch.Generator().manual_seed(7))) for _ in range(5)]
    assert a == b


def test_generate_cli_prompt_sources_and_seed(byte_model, tmp_path, capsys, monkeypatch):
    args = ["--model", byte_model, "--max-new-tokens", "24", "--seed", "3", "--top-k", "20", "--quiet"]
    assert generate_main([*args, "--prompt", "héllo ☃ "]) == 0  # any UTF-8 fits a byte vocabulary
    first = capsys.readouterr().out
    assert first.startswith("héllo ☃ ")
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("héllo ☃ ", encoding="utf-8")
    assert generate_main([*args, "--prompt-file", str(prompt_file)]) == 0
    assert capsys.readouterr().out == first
    monkeypatch.setattr(sys, "stdin", io.StringIO("héllo ☃ "))
    assert generate_main([*args, "--prompt", "-"]) == 0
    assert capsys.readouterr().out == first


def test_text8_prompt_outside_alphabet_is_one_clear_error(tmp_path, capsys):
    model_dir = make_model_dir(str(tmp_path / "t8"), vocab=27)
    assert generate_main(["--model", model_dir, "--prompt", "hello world", "--max-new-tokens", "5", "--quiet"]) == 0
    capsys.readouterr()
    assert generate_main(["--model", model_dir, "--prompt", "Hello, World!", "--max-new-tokens", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "text8" in err and "Traceback" not in err


@pytest.mark.parametrize("device", ["gpu0", "cuda:99", "meta"])
def test_generate_bad_device_is_one_clear_error(byte_model, capsys, device):
    assert generate_main(["--model", byte_model, "--prompt", "x", "--max-new-tokens", "2", "--device", device]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: device '{device}' cannot be used"), err


def test_config_that_does_not_match_the_weights(byte_model, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(byte_model):
        (bad / name).write_bytes(open(os.path.join(byte_model, name), "rb").read())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hidden_size"], cfg["num_attention_heads"] = 64, 2
    (bad / "config.json").write_text(json.dumps(cfg))
    assert generate_main(["--model", str(bad), "--prompt", "x", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "do not match the config" in err and "Traceback" not in err


def test_consolidated_loads_and_generates_without_deepspeed(byte_model):
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "deepspeed" or name.startswith("deepspeed."):
            raise ImportError("deepspeed is blocked in this test")
sys.meta_path.insert(0, Block())
sys.path.insert(0, {ROOT!r})
from megatron_ls.cli.generate import main
rc = main(["--model", {byte_model!r}, "--prompt", "abc", "--max-new-tokens", "8", "--seed", "0", "--quiet"])
assert rc == 0, rc
assert not any(m == "deepspeed" or m.startswith("deepspeed.") for m in sys.modules), "deepspeed got imported"
print("OK")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("OK")


def test_tools_script_bad_folder_exits_nonzero_without_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--model",
                          str(tmp_path / "empty"), "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.startswith("error:") and "latest" in res.stderr and "Traceback" not in res.stderr
