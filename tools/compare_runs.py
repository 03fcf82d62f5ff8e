#!/usr/bin/env python
"""Test BPC against context of several runs (their tools/evaluate.py results), a PNG or SVG and a table; see --help."""

import os
import sys

try:
    import megatron_ls  # noqa: F401
except ImportError:  # running from a checkout that was not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ls.tool_signals import stopping_while_loading

with stopping_while_loading("compare_runs.py"):
    from megatron_ls.cli.compare_runs import main

if __name__ == "__main__":
    sys.exit(main())
