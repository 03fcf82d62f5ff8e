"""The one error type of inference and conversion: a message for the user, printed without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class InferenceError(Exception):
    pass


def run_cli(body: Callable[[], object]) -> int:
    """Exit status of a command-line tool's body: 0, or 1 after one 'error: ...' line for an InferenceError."""
    try:
        body()
    except InferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
