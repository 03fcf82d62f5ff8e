"""One figure of several runs: a panel per quantity (loss, BPC, learning rate, tokens/s) against iteration or time."""

from __future__ import annotations

from collections.abc import Sequence

from megatron_ls.plotting.figure import new_figure, save
from megatron_ls.plotting.runs import Run

# panel -> (title, [(metrics.jsonl key, line style), ...]); validation points are drawn as markers.
PANELS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "loss": ("loss (nats / token)", [("lm_loss", "train"), ("valid_loss", "valid")]),
    "bpc": ("bits per character", [("bpc", "train"), ("valid_bpc", "valid")]),
    "valid_bpc": ("validation bits per character", [("valid_bpc", "valid")]),
    "lr": ("learning rate", [("lr", "train")]),
    "tokens_per_second": ("tokens / s", [("tokens_per_second", "train")]),
    "grad_norm": ("gradient norm", [("grad_norm", "train")]),
}
DEFAULT_PANELS = ("loss", "bpc", "lr", "tokens_per_second")
X_AXES = {"iteration": ("iteration", "iteration"), "time": ("elapsed_seconds", "wall-clock (s)")}


def plot_runs(runs: Sequence[Run], output: str, panels: Sequence[str] = DEFAULT_PANELS, x: str = "iteration",
              width_px: int = 1200, height_px: int = 800, title: str | None = None) -> list[str]:
    """Draw and write the figure; returns notes on panels that had nothing to draw (they stay, empty, with a
    'no data' label, so a figure always has the same layout)."""
    unknown = [p for p in panels if p not in PANELS]
    if unknown:
        raise ValueError(f"unknown panel(s) {', '.join(unknown)}; known: {', '.join(PANELS)}")
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    x_key, x_label = X_AXES[x]
    fig = new_figure(width_px, height_px)
    cols = 1 if len(panels) == 1 else 2
    rows = -(-len(panels) // cols)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    notes = []
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        label, series = PANELS[panel]
        drawn = 0
        for run, colour in zip(runs, colours):
            for key, kind in series:
                xs, ys = run.series(key, x_key)
                if not xs:
                    continue
                drawn += 1
                name = run.name if len(series) == 1 else f"{run.name} ({kind})"
                if kind == "valid" and len(series) > 1:
                    ax.plot(xs, ys, "o--", color=colour, markersize=4, linewidth=1, label=name)
                else:
                    ax.plot(xs, ys, "-" if kind == "train" else "o-", color=colour, linewidth=1.2,
                            markersize=4, label=name)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(x_label, fontsize=9)
        ax.grid(True, alpha=0.3)
        if panel == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
            notes.append(f"no run has {label} against {x_label}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save(fig, output)
    return notes
