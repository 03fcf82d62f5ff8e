"""Checkpoints written before the package reorganisation (tests/fixtures/checkpoint_v1, see its README) still resume
exactly where they stopped, convert, evaluate and start a --finetune."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
from training_utils import ROOT, env, run

pytestmark = pytest.mark.slow
V1 = os.path.join(ROOT, "tests", "fixtures", "checkpoint_v1")
MODEL = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--ffn-hidden-size", "32",
         "--window-size", "8", "--chunk-size", "4", "--seq-length", "16", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--eval-iters", "0", "--log-interval", "1", "--seed", "3"]


def corpus() -> str:
    """The text the checkpoint was trained on (its data fingerprint must match for a resume)."""
    rng = random.Random(12)
    words = ["alpha", "beta", "gamma", "delta", "long", "short", "memory", "landmark", "window", "chunk", "the",
             "a", "of", "and"]
    return " ".join(rng.choice(words) for _ in range(12000)) + "\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("v1data")
    (folder / "corpus.txt").write_text(corpus())
    prefix = str(folder / "c")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--dataset", "text",
                    "--input", str(folder / "corpus.txt"), "--output-prefix", prefix, "--no-progress"], check=True,
                   env=env(), capture_output=True, timeout=120)
    return prefix


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args], env=env(), capture_output=True,
                          text=True, timeout=180)


@pytest.mark.timeout(300)
def test_a_checkpoint_of_the_previous_version_resumes(data, tmp_path):
    save = str(tmp_path / "ck")
    shutil.copytree(V1, save, ignore=shutil.ignore_patterns("README.md"))
    r = run(["--data-path", data, *MODEL, "--train-iters", "4", "--save", save, "--load", save])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {save}/iter_0000002 at iteration 2" in r.stdout
    iterations = [json.loads(line)["iteration"] for line in open(os.path.join(save, "metrics.jsonl"))]
    assert iterations == [1, 2, 3, 4]


@pytest.mark.timeout(300)
def test_the_tools_and_finetune_read_it(data, tmp_path):
    out = str(tmp_path / "consolidated")
    r = _tool("convert_checkpoint.py", "--load", V1, "--output", out)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _tool("evaluate.py", "--model", out, "--data-path", data, "--split", "test", "--context", "32", "--step",
              "16", "--max-tokens", "200", "--no-progress")
    assert r.returncode == 0 and "test bits per character" in r.stdout, r.stderr[-2000:]
    r = run(["--data-path", data, *MODEL, "--train-iters", "1", "--load", V1, "--finetune"])
    assert r.returncode == 0 and "--finetune" in r.stdout, r.stderr[-3000:]
