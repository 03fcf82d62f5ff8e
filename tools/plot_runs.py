#!/usr/bin/env python
"""Loss, BPC, learning rate and tokens/s of training runs from their metrics.jsonl, as a PNG or SVG; see --help."""

import os
import sys

try:
    import megatron_ls  # noqa: F401
except ImportError:  # running from a checkout that was not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ls.tool_signals import stopping_while_loading

with stopping_while_loading("plot_runs.py"):
    from megatron_ls.cli.plot_runs import main

if __name__ == "__main__":
    sys.exit(main())
