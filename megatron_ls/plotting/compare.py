"""Test BPC against context for several runs, and the comparison table (examples/compare_attention.sh).

    python tools/compare_runs.py runs/compare/long-short runs/compare/window runs/compare/full \\
        --output runs/compare/test_bpc_by_context.png

Each RUN is a training --save folder holding ``eval/*.json``, the outputs of tools/evaluate.py --output (one per
context). The table has one row per run: parameters, training time and final validation BPC (metrics.jsonl),
and the test BPC at each context.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Sequence

from megatron_ls.plotting.figure import new_figure, save
from megatron_ls.plotting.runs import RunError, read_run, unique_names


def read_evaluations(run: str) -> dict[int, dict]:
    """context -> the evaluate.py result of RUN/eval/*.json (RunError when there is none)."""
    results = {}
    for path in sorted(glob.glob(os.path.join(run, "eval", "*.json"))):
        try:
            with open(path) as f:
                rec = json.load(f)
            results[int(rec["context"])] = rec
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunError(f"{path} is not an output of tools/evaluate.py --output: {e}") from None
    if not results:
        raise RunError(f"{run}/eval holds no tools/evaluate.py results (*.json)")
    return results


def summarize(runs: Sequence[str]) -> list[dict]:
    rows = []
    for path, name in zip(runs, unique_names(list(runs))):
        run = read_run(path, name)
        evals = read_evaluations(path)
        _, valid = run.series("valid_bpc")
        _, elapsed = run.series("elapsed_seconds")
        params = {r.get("parameters") for r in evals.values()} - {None}
        rows.append({"run": name, "path": path, "parameters": params.pop() if len(params) == 1 else None,
                     "train_seconds": elapsed[-1] if elapsed else None, "valid_bpc": valid[-1] if valid else None,
                     "test_bpc": {ctx: evals[ctx]["bpc"] for ctx in sorted(evals)}})
    return rows


def table(rows: Sequence[dict]) -> str:
    contexts = sorted({c for r in rows for c in r["test_bpc"]})
    head = (f"{'model':<12} {'params':>9} {'train s':>8} {'valid':>7} "
            + " ".join(f"{'ctx ' + str(c):>9}" for c in contexts))
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = [f"{r['test_bpc'][c]:>9.3f}" if c in r["test_bpc"] else f"{'-':>9}" for c in contexts]
        lines.append(f"{r['run']:<12} {_num(r['parameters'], ',d', 9)} {_num(r['train_seconds'], '.0f', 8)} "
                     f"{_num(r['valid_bpc'], '.3f', 7)} " + " ".join(cells))
    lines.append("valid: final validation BPC of the run; ctx N: test BPC, each token predicted from at most N tokens")
    return "\n".join(lines)


def _num(v, fmt: str, width: int) -> str:
    return f"{v:>{width}{fmt}}" if isinstance(v, (int, float)) and math.isfinite(v) else f"{'-':>{width}}"


def plot_contexts(rows: Sequence[dict], output: str, width_px: int = 800, height_px: int = 500) -> None:
    fig = new_figure(width_px, height_px)
    ax = fig.add_subplot(1, 1, 1)
    for i, r in enumerate(rows):
        ctx = sorted(r["test_bpc"])
        ax.plot(ctx, [r["test_bpc"][c] for c in ctx], "o-", color=f"C{i}", label=r["run"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (most tokens behind a prediction)")
    ax.set_ylabel("test bits per character")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title("test BPC against context", fontsize=10)
    fig.tight_layout()
    save(fig, output)
