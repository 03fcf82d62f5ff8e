"""tools/compare_runs.py: test BPC against context for several runs, a PNG/SVG and the comparison table.

    python tools/compare_runs.py runs/compare/long-short runs/compare/window runs/compare/full \\
        --output runs/compare/test_bpc_by_context.png --summary runs/compare/summary.json

Each RUN is a training --save folder holding ``eval/*.json``, the outputs of tools/evaluate.py --output (one per
context); see megatron_ls/plotting/compare.py. examples/compare_attention.sh runs it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from megatron_ls.cli.runner import run_cli
from megatron_ls.plotting.compare import plot_contexts, summarize, table
from megatron_ls.plotting.figure import check_output

PROG = "compare_runs.py"


def run(args: argparse.Namespace) -> None:
    check_output(args.output)  # before reading anything
    rows = summarize(args.runs)
    plot_contexts(rows, args.output)
    print(table(rows))
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"wrote {args.output}" + (f" and {args.summary}" if args.summary else ""))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="training --save folders holding eval/*.json")
    p.add_argument("--output", required=True, help="PNG or SVG of test BPC against context")
    p.add_argument("--summary", help="also write the table's numbers as JSON here")
    args = p.parse_args(argv)
    return run_cli(lambda: run(args), PROG, error_prefix=f"{PROG}: error: ")
