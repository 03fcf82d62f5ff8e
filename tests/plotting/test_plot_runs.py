"""tools/plot_runs.py: figures of real runs, and runs that are empty, still writing, or of another version."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from png_files import png_size
from training_utils import ROOT, TINY, env, make_shards, run

from megatron_ls.cli.plot_runs import main
from megatron_ls.plotting.runs import read_run

TOOL = os.path.join(ROOT, "tools", "plot_runs.py")



def write_metrics(folder, records, tail: str = "") -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(tail)
    return str(folder)


def train_record(i: int, **extra) -> dict:
    rec = {"iteration": i, "lm_loss": 3.0 - 0.1 * i, "bpc": (3.0 - 0.1 * i) / 0.693, "lr": 1e-3 * i,
           "tokens_per_second": 1000.0 + i, "elapsed_seconds": 0.5 * i}
    rec.update(extra)
    return rec


@pytest.mark.slow
def test_two_real_runs_render_a_png_of_the_asked_size(tmp_path):
    data = make_shards(str(tmp_path / "data" / "pydoc"))
    saves = []
    for kind in ("long-short", "window"):
        save = str(tmp_path / kind)
        r = run(["--data-path", data, *TINY, "--attention-type", kind, "--train-iters", "6", "--eval-interval", "3",
                 "--save", save])
        assert r.returncode == 0, r.stderr[-2000:]
        saves.append(save)
    out = tmp_path / "plots" / "runs.png"
    r = subprocess.run([sys.executable, TOOL, *saves, "--output", str(out), "--width", "900", "--height", "600"],
                       env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert png_size(str(out)) == (900, 600)
    assert "wrote" in r.stdout and r.stderr == ""
    svg = tmp_path / "runs.svg"
    assert main([*saves, "--x", "time", "--panels", "valid_bpc", "--output", str(svg)]) == 0
    assert b"<svg" in svg.read_bytes()[:2000]


def test_a_run_still_writing_is_read_to_its_last_whole_line(tmp_path, capsys):
    folder = write_metrics(tmp_path / "live", [train_record(i) for i in range(1, 4)] + [
        {"iteration": 3, "valid_loss": 2.5, "valid_bpc": 3.6, "valid_tokens": 64, "final": False}],
        tail='{"iteration": 4, "lm_lo')
    run_ = read_run(folder)
    assert [r["iteration"] for r in run_.train] == [1, 2, 3] and run_.skipped_lines == 1
    assert run_.series("valid_bpc", "elapsed_seconds") == ([1.5], [3.6])  # the time of iteration 3's record
    out = tmp_path / "live.png"
    assert main([folder, "--output", str(out), "--width", "640", "--height", "480"]) == 0
    assert png_size(str(out)) == (640, 480)
    assert "skipped 1 line" in capsys.readouterr().err


def test_mixed_runs_draw_what_each_has(tmp_path, capsys):
    new = write_metrics(tmp_path / "a" / "run", [train_record(i) for i in range(1, 5)])
    # An older writer: no tokens/s, no elapsed time, a null where a value was not finite.
    old = write_metrics(tmp_path / "b" / "run", [{"iteration": i, "lm_loss": 2.0, "bpc": None, "lr": 1e-3}
                                                 for i in range(1, 5)])
    out = tmp_path / "mixed.png"
    assert main([new, old, "--output", str(out)]) == 0
    assert png_size(str(out)) == (1200, 800)
    assert read_run(old).series("bpc") == ([], [])
    # Against wall-clock only the new run has points; a panel nobody can fill says so.
    assert main([old, "--x", "time", "--panels", "loss", "--output", str(tmp_path / "t.png")]) == 0
    assert "no run has loss (nats / token) against wall-clock" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["no-folder", "no-metrics", "empty", "garbage", "bad-extension", "bad-panel"])
def test_bad_input_is_one_line_and_nonzero(tmp_path, case):
    out = str(tmp_path / "x.png")
    args = {
        "no-folder": [str(tmp_path / "missing")],
        "no-metrics": [str(tmp_path)],
        "empty": [write_metrics(tmp_path / "e", [])],
        "garbage": [write_metrics(tmp_path / "g", [], tail="not json\n[1, 2]\n")],
        "bad-extension": [write_metrics(tmp_path / "r", [train_record(1)]), "--output", str(tmp_path / "x.jpg")],
        "bad-panel": [write_metrics(tmp_path / "r", [train_record(1)]), "--panels", "loss,speed"],
    }[case]
    if "--output" not in args:
        args += ["--output", out]
    r = subprocess.run([sys.executable, TOOL, *args], env=env(), capture_output=True, text=True, timeout=60)
    assert r.returncode in (1, 2), r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plot_runs.py: error:"), r.stderr
    assert "Traceback" not in r.stderr and not os.path.exists(out)


def test_without_matplotlib_one_line_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    folder = write_metrics(tmp_path / "r", [train_record(1), train_record(2)])
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main([folder, "--output", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("plot_runs.py: error: matplotlib is not installed: pip install 'megatron-ls[plot]' "
                   "(or pip install -r requirements.txt)")
    assert not os.path.exists(tmp_path / "x.png")


def test_compare_table_and_context_plot(tmp_path, capsys):
    from megatron_ls.cli.compare_runs import main as compare_main

    runs = []
    for name, bpcs in (("long-short", (2.4, 2.3)), ("window", (2.5, 2.5))):
        run_ = write_metrics(tmp_path / name, [train_record(1), train_record(2),
                                               {"iteration": 2, "valid_loss": 1.7, "valid_bpc": 2.45}])
        os.makedirs(tmp_path / name / "eval")
        for ctx, bpc in zip((128, 512), bpcs):
            (tmp_path / name / "eval" / f"context_{ctx}.json").write_text(
                json.dumps({"bpc": bpc, "context": ctx, "step": 128, "parameters": 1000 + len(name)}))
        runs.append(run_)
    out = tmp_path / "ctx.png"
    assert compare_main([*runs, "--output", str(out), "--summary", str(tmp_path / "s.json")]) == 0
    assert png_size(str(out)) == (800, 500)
    table = capsys.readouterr().out
    assert "ctx 128" in table and "ctx 512" in table and "2.300" in table and "1,010" in table
    rows = json.loads((tmp_path / "s.json").read_text())
    assert rows[0]["test_bpc"] == {"128": 2.4, "512": 2.3} and rows[1]["valid_bpc"] == 2.45
    # A run without evaluations: one line, exit 1.
    os.makedirs(tmp_path / "bare")
    write_metrics(tmp_path / "bare", [train_record(1)])
    assert compare_main([runs[0], str(tmp_path / "bare"), "--output", str(out)]) == 1
    assert capsys.readouterr().err.strip().endswith("holds no tools/evaluate.py results (*.json)")


@pytest.mark.slow
def test_compare_attention_example_runs_small(tmp_path):
    """examples/compare_attention.sh at 2 steps, two types, two contexts, 2,000 test tokens: its pictures and table."""
    data = make_shards(str(tmp_path / "data" / "pydoc"))
    out = tmp_path / "compare"
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "compare_attention.sh"), "--data-path", data,
                        "--out", str(out), "--iters", "2", "--contexts", "128 256", "--types", "long-short window",
                        "--eval-tokens", "2000"], env=env(), capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert png_size(str(out / "valid_bpc.png")) == (1200, 800)
    assert png_size(str(out / "test_bpc_by_context.png")) == (800, 500)
    rows = json.loads((out / "summary.json").read_text())
    assert [row["run"] for row in rows] == ["long-short", "window"]
    assert all(set(row["test_bpc"]) == {"128", "256"} and row["parameters"] > 0 for row in rows)
    assert "ctx 256" in r.stdout
