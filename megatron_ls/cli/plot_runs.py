"""tools/plot_runs.py: loss, BPC, learning rate and tokens/s of training runs, from their metrics.jsonl.

    python tools/plot_runs.py runs/a runs/b --output runs.png
    python tools/plot_runs.py runs/* --x time --panels bpc,tokens_per_second --output runs.svg

A RUN is a --save folder of pretrain_char_lm.py or a metrics.jsonl. Runs still being written are read up to
their last whole line. Needs matplotlib: pip install 'megatron-ls[plot]'.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megatron_ls.cli.runner import run_cli
from megatron_ls.plotting.figure import check_output
from megatron_ls.plotting.run_plots import DEFAULT_PANELS, PANELS, X_AXES, plot_runs
from megatron_ls.plotting.runs import read_run, unique_names

PROG = "plot_runs.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _panels(text: str) -> list[str]:
    panels = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in panels if p not in PANELS]
    if not panels or unknown:
        raise argparse.ArgumentTypeError(f"panels must be a comma-separated list of {', '.join(PANELS)}; "
                                         f"got {text!r}")
    return panels


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (--save of a training run) or metrics.jsonl")
    p.add_argument("--output", default="runs.png", help="PNG or SVG file to write (default runs.png)")
    p.add_argument("--x", choices=list(X_AXES), default="iteration", help="horizontal axis (default iteration)")
    p.add_argument("--panels", type=_panels, default=list(DEFAULT_PANELS),
                   help=f"comma-separated, of {', '.join(PANELS)} (default {','.join(DEFAULT_PANELS)})")
    p.add_argument("--width", type=int, default=1200, help="pixels (default 1200)")
    p.add_argument("--height", type=int, default=800, help="pixels (default 800)")
    p.add_argument("--title", default=None)
    return p


def run(args: argparse.Namespace) -> None:
    check_output(args.output)  # before reading anything
    runs = [read_run(path, name) for path, name in zip(args.runs, unique_names(args.runs))]
    for r in runs:
        if r.skipped_lines:
            print(f"{PROG}: {r.path}: skipped {r.skipped_lines} line(s) that are not a whole JSON record "
                  "(a run still writing, or cut short)", file=sys.stderr)
    notes = plot_runs(runs, args.output, args.panels, args.x, args.width, args.height, args.title)
    for note in notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    print(f"wrote {args.output} ({len(runs)} run{'s' if len(runs) > 1 else ''})")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), PROG, error_prefix=f"{PROG}: error: ")
