"""Figures with matplotlib, an optional dependency: `pip install megatron-ls[plot]`.

matplotlib is imported only when a figure is drawn, and through its object interface (no pyplot state), so
that the rest of the package works without it and a missing install is one clear line.
"""

from __future__ import annotations

import os
from typing import Any

from megatron_ls.errors import UserError

FORMATS = (".png", ".svg")
DPI = 100


class PlotError(UserError):
    """A figure that cannot be drawn or written; the message says why."""


def new_figure(width_px: int, height_px: int) -> Any:
    """An empty matplotlib Figure of exactly width_px x height_px pixels when saved as PNG."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install 'megatron-ls[plot]' "
                        "(or pip install -r requirements.txt)") from None
    if width_px < 100 or height_px < 100:
        raise PlotError(f"the figure must be at least 100 x 100 pixels, got {width_px} x {height_px}")
    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)


def check_output(path: str) -> str:
    """The format of ``path`` (png or svg), or PlotError for another extension or an unwritable folder."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise PlotError(f"--output {path}: the name must end in .png or .svg")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise PlotError(f"--output {path}: {folder} is not a folder")
    return ext[1:]


def save(fig: Any, path: str) -> None:
    """Write the figure (format from the extension), whole or not at all."""
    fmt = check_output(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        fig.savefig(tmp, format=fmt, dpi=DPI)
        os.replace(tmp, path)
    except OSError as e:
        raise PlotError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
