"""The one error type of inference and conversion: a message for the user, printed without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class InferenceError(Exception):
    pass


def run_cli(body: Callable[[], object], prog: str) -> int:
    """Exit status of a command-line tool's body: 0, or 1 after one 'error: ...' line.

    Besides InferenceError, a DataError (a tokenizer or shard problem met past the up-front checks) and an
    OSError (disk full, permission denied while writing, ...) are bad input or environment too, not bugs.
    Ctrl-C (130) and SIGTERM (143) end it with one line '<prog>: interrupted' / 'terminated', after the
    cleanup of whatever the body was writing (SIGTERM raises, as SIGINT does).
    """
    from megatron_ls.data.errors import DataError
    from megatron_ls.tool_signals import Terminated, sigterm_raises, stop_line

    try:
        with sigterm_raises():
            body()
    except (InferenceError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as e:
        line, status = stop_line(prog, e)
        print(line, file=sys.stderr)
        return status
    return 0
