#!/usr/bin/env python
"""Convert a training checkpoint to the consolidated inference checkpoint and back; see --help."""

import os
import sys

try:
    import megatron_ls  # noqa: F401
except ImportError:  # running from a checkout that was not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ls.tool_signals import stopping_while_loading

with stopping_while_loading("convert_checkpoint.py"):  # torch loads here: seconds
    from megatron_ls.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
