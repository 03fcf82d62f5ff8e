#!/usr/bin/env python
"""Sample text from a model with the incremental (landmark-cache) decoder; see --help."""

import os
import sys

try:
    import megatron_ls  # noqa: F401
except ImportError:  # running from a checkout that was not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ls.tool_signals import stopping_while_loading

with stopping_while_loading("generate.py"):  # torch loads here: seconds
    from megatron_ls.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
