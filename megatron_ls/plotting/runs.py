"""Read the metrics.jsonl of training runs for plotting, forgiving of runs still being written.

A run is a --save folder (or the metrics.jsonl itself). Training records carry ``lm_loss``, ``bpc``, ``lr``,
``tokens_per_second`` and ``elapsed_seconds``; evaluation records ``valid_loss`` and ``valid_bpc`` (see
megatron_ls/training/logging.py). A last line cut short (the run is still writing, or was killed mid-line) is
skipped, and so is any other line that is not one JSON object; runs of other versions may lack some keys, and
each series simply has the points whose records hold its key.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from megatron_ls.errors import UserError

METRICS_FILE = "metrics.jsonl"  # the name megatron_ls.training.logging writes


class RunError(UserError):
    """A run that cannot be plotted: the message names the run and the problem."""


@dataclass
class Run:
    name: str
    path: str
    train: list[dict] = field(default_factory=list)  # records with lm_loss, in file order
    valid: list[dict] = field(default_factory=list)  # records with valid_loss
    skipped_lines: int = 0  # lines that were not a JSON object (a truncated last line included)

    def series(self, key: str, x: str = "iteration") -> tuple[list[float], list[float]]:
        """(xs, ys) of ``key`` against ``x`` ("iteration" or "elapsed_seconds"), finite points only.

        Validation records hold no time of their own: against wall-clock they take the elapsed time of the
        training record of the same iteration (the last one logged before it).
        """
        records = self.valid if key.startswith("valid_") else self.train
        clock = _elapsed_by_iteration(self.train) if x == "elapsed_seconds" else None
        xs, ys = [], []
        for rec in records:
            y = rec.get(key)
            at = rec.get("iteration") if clock is None else _time_at(clock, rec.get("iteration"))
            if _finite(y) and _finite(at):
                xs.append(float(at))
                ys.append(float(y))
        return xs, ys


def metrics_path(path: str) -> str:
    return os.path.join(path, METRICS_FILE) if os.path.isdir(path) else path


def read_run(path: str, name: str | None = None) -> Run:
    """The records of one run; RunError when there is no file or not one usable record in it."""
    file = metrics_path(path)
    label = name or os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(file)
                                                      or "."))
    if not os.path.exists(file):
        where = f"{path} holds no {METRICS_FILE}" if os.path.isdir(path) else f"{path} does not exist"
        raise RunError(f"{where} (a run writes it into its --save folder)")
    run = Run(label, file)
    try:
        with open(file, encoding="utf-8", errors="replace") as f:
            for line in f:
                rec = _parse(line)
                if rec is None:
                    run.skipped_lines += bool(line.strip())
                elif "lm_loss" in rec or "bpc" in rec:
                    run.train.append(rec)
                elif "valid_loss" in rec or "valid_bpc" in rec:
                    run.valid.append(rec)
    except OSError as e:
        raise RunError(f"cannot read {file}: {e.strerror or e}") from None
    if not run.train and not run.valid:
        raise RunError(f"{file} holds no training or validation records yet")
    return run


def unique_names(paths: list[str]) -> list[str]:
    """Legend labels: each run's folder name, with the parent folder added where two runs share one."""
    names = [os.path.basename(os.path.normpath(p if os.path.isdir(p) else os.path.dirname(p) or ".")) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [os.path.normpath(p if os.path.isdir(p) else os.path.dirname(p) or ".") for p in paths]


def _parse(line: str) -> dict | None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _elapsed_by_iteration(train: list[dict]) -> list[tuple[float, float]]:
    return sorted((r["iteration"], r["elapsed_seconds"]) for r in train
                  if _finite(r.get("iteration")) and _finite(r.get("elapsed_seconds")))


def _time_at(clock: list[tuple[float, float]], iteration) -> float | None:
    if not _finite(iteration):
        return None
    best = None
    for it, t in clock:
        if it > iteration:
            break
        best = t
    return best
