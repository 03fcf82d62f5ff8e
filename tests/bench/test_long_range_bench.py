"""bench/long_range.py end to end at a tiny size (the pipeline, not the accuracy) and its bad flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from png_files import png_size
from training_utils import ROOT, env


@pytest.mark.slow
def test_tiny_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "results" / "long_range.json"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "long_range.py"), "--work-dir", str(tmp_path / "work"),
         "--output", str(out), "--window", "16", "--chunk", "8", "--seq-length", "32", "--mem-length", "64",
         "--layers", "1", "--hidden", "32", "--heads", "2", "--batch", "2", "--steps", "4", "--warmup", "1",
         "--eval-interval", "2", "--test-bytes", "6000"],
        env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["models"]) == ["long-short", "window", "full"]
    assert result["chance"] == pytest.approx(1 / 26)
    for kind, model in result["models"].items():
        buckets = model["buckets"]
        assert [(b["low"], b["high"]) for b in buckets] == [(8, 16), (16, 32), (32, 64), (64, 128), (128, 256),
                                                             (256, 512)], kind
        assert sum(b["queries"] for b in buckets) > 50
        assert all(0 <= b["correct"] <= b["queries"] for b in buckets)
        assert model["wall_seconds"] > 0 and model["parameters"] > 0
        with open(os.path.join(model["run"], "metrics.jsonl")) as f:
            assert sum("lm_loss" in json.loads(line) for line in f) >= 1
        with open(os.path.join(model["run"], "iter_0000004", "run_state.json")) as f:
            assert json.load(f)["run"]["loss_weight"] == ["a-z=20"]  # the values' loss weight, every model alike
    # Equal size: window and full get the FFN width that makes up for long-short's extra attention parameters,
    # to within half an FFN unit (2 x hidden + 1 parameters) per layer.
    params = {k: m["parameters"] for k, m in result["models"].items()}
    assert all(abs(p - params["long-short"]) <= (2 * 32 + 1) // 2 for p in params.values()), params
    assert png_size(str(out.with_suffix(".png"))) == (900, 560)
    assert "long-short" in r.stdout and "chance" in r.stdout


@pytest.mark.parametrize("flags", [["--types", "long-short,bogus"], ["--max-windows", "12"], ["--window", "30"]])
def test_bad_flags_are_one_line(tmp_path, flags):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "long_range.py"), "--work-dir", str(tmp_path),
                        *flags], env=env(), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("long_range.py: error:") and r.stderr.count("\n") == 1
    assert not os.listdir(tmp_path)
