"""tools/generate.py bad inputs found by a sweep: each is one 'error:' line and exit 1, never a traceback."""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest
import torch
from model_dirs import make_model_dir

from megatron_ls.cli.generate import __doc__ as generate_help
from megatron_ls.cli.generate import encode_prompt
from megatron_ls.cli.generate import main as generate_main
from megatron_ls.cli.runner import run_cli
from megatron_ls.data.tokenizers import ByteTokenizer, Text8Tokenizer
from megatron_ls.errors import DataError, InferenceError
from megatron_ls.inference.model_source import load_model
from megatron_ls.inference.sampling import sample_next


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> str:
    return make_model_dir(str(tmp_path_factory.mktemp("byte_model")))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "inf"),
                                         ("--temperature", "-1"), ("--top-p", "nan"), ("--top-k", "-1")])
def test_sampling_settings_name_the_flag(byte_model, capsys, flag, value):
    assert generate_main(["--model", byte_model, "--prompt", "ab", "--max-new-tokens", "3", flag, value]) == 1
    assert _one_error_line(capsys).startswith(f"error: {flag} must be")


@pytest.mark.parametrize("temperature", [float("nan"), float("inf")])
def test_sample_next_refuses_a_temperature_that_is_not_finite(temperature):
    with pytest.raises(ValueError, match="finite temperature"):
        sample_next(torch.zeros(1, 4), temperature=temperature)


def test_tokenizer_of_another_vocabulary_is_refused_at_load(byte_model, tmp_path, capsys):
    """text8's tokenizer.json beside a 256-token model: refused when loading, not at the first decode."""
    bad = tmp_path / "bad"
    shutil.copytree(byte_model, bad)
    (bad / "tokenizer.json").write_text(json.dumps(Text8Tokenizer().describe()))
    with pytest.raises(InferenceError, match="27 ids.*vocabulary of 256"):
        load_model(str(bad))
    assert generate_main(["--model", str(bad), "--prompt", "ab", "--max-new-tokens", "3"]) == 1
    assert "does not fit" in _one_error_line(capsys)


def test_run_cli_turns_data_and_os_errors_into_one_line(capsys):
    def data_error():
        raise DataError("text8 ids must be in 0..26, got 1..254")

    def os_error():
        raise PermissionError(13, "Permission denied", "/sys/x")

    assert run_cli(data_error, "t") == 1
    assert _one_error_line(capsys) == "error: text8 ids must be in 0..26, got 1..254"
    assert run_cli(os_error, "t") == 1
    assert _one_error_line(capsys) == "error: Permission denied: /sys/x"


def test_byte_model_takes_a_prompt_file_that_is_not_utf8(byte_model, tmp_path, capsys):
    prompt = tmp_path / "p.bin"
    prompt.write_bytes(b"ab\xff\xfe")
    assert generate_main(["--model", byte_model, "--prompt-file", str(prompt), "--max-new-tokens", "3"]) == 0
    assert "[4 prompt tokens" in capsys.readouterr().err
    assert encode_prompt(ByteTokenizer(), b"ab\xff\xfe") == [97, 98, 255, 254]
    assert encode_prompt(ByteTokenizer(), "ab\udcff") == [97, 98, 255]  # an undecodable byte of the command line


def test_other_tokenizers_say_the_prompt_is_not_utf8(tmp_path, capsys, monkeypatch):
    model = make_model_dir(str(tmp_path / "t8"), vocab=27)
    prompt = tmp_path / "p.bin"
    prompt.write_bytes(b"ab\xff\xfe")
    assert generate_main(["--model", model, "--prompt-file", str(prompt), "--max-new-tokens", "3"]) == 1
    assert f"--prompt-file {prompt} is not valid UTF-8 (at offset 2)" in _one_error_line(capsys)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ab\xff")))
    assert generate_main(["--model", model, "--prompt", "-", "--max-new-tokens", "3"]) == 1
    assert "the prompt on stdin is not valid UTF-8" in _one_error_line(capsys)


def test_help_example_for_stdin_has_no_trailing_newline(tmp_path, capsys, monkeypatch):
    """The documented stdin example uses printf: echo's newline is outside text8's alphabet."""
    example = next(line for line in generate_help.splitlines() if "--prompt -" in line)
    assert example.strip().startswith("printf 'text' |")
    model = make_model_dir(str(tmp_path / "t8"), vocab=27)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"text")))  # what printf 'text' writes
    assert generate_main(["--model", model, "--prompt", "-", "--max-new-tokens", "3", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("text")
