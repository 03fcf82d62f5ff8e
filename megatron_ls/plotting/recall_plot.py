"""The picture of bench/long_range.py: recall accuracy against distance, one line per model, chance and window."""

from __future__ import annotations

import math

from megatron_ls.plotting.figure import new_figure, save


def plot_recall(result: dict, output: str, width_px: int = 900, height_px: int = 560) -> None:
    """``result`` as bench/long_range.py writes it: models -> buckets (low, high, accuracy, queries)."""
    fig = new_figure(width_px, height_px)
    ax = fig.add_subplot(1, 1, 1)
    w = result["config"]["window"]
    for i, (kind, model) in enumerate(result["models"].items()):
        pts = [(math.sqrt(b["low"] * b["high"]) / w, b["accuracy"]) for b in model["buckets"]
               if b["queries"] and math.isfinite(b["accuracy"])]
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", color=f"C{i}", label=kind)
    ax.axhline(result["chance"], color="grey", linestyle=":", label=f"chance ({result['chance']:.1%})")
    ax.axhline(10 * result["chance"], color="grey", linestyle="--", linewidth=0.8, label="10 x chance")
    ax.axvline(1.0, color="black", linewidth=0.8, alpha=0.5)
    ax.text(1.0, 0.97, " window", transform=ax.get_xaxis_transform(), fontsize=8, va="top")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"distance from the record (in windows, w = {w} bytes; bucket centres)")
    ax.set_ylabel("recall accuracy (most likely byte = value)")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    cfg = result["config"]
    ax.set_title(f"key=value recall: {cfg['layers']} layers, width {cfg['hidden']}, chunk {cfg['chunk']}, "
                 f"memory {cfg['mem_length']} + segment {cfg['seq_length']}, {cfg['steps']} steps", fontsize=10)
    fig.tight_layout()
    save(fig, output)
