"""The one error type of inference and conversion: a message for the user, printed without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class InferenceError(Exception):
    pass


def run_cli(body: Callable[[], object]) -> int:
    """Exit status of a command-line tool's body: 0, or 1 after one 'error: ...' line.

    Besides InferenceError, a DataError (a tokenizer or shard problem met past the up-front checks) and an
    OSError (disk full, permission denied while writing, ...) are bad input or environment too, not bugs.
    """
    from megatron_ls.data.errors import DataError

    try:
        body()
    except (InferenceError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    return 0
