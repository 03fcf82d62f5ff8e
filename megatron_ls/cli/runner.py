"""The one way an entry point ends: 0, or one line and a status, never a traceback for something a user can fix.

- a ``UserError`` (bad flags, data, checkpoint, layout, model) or an ``OSError`` (disk full, permission
  denied while writing, ...): one '<prefix>error: ...' line, exit 1;
- Ctrl-C (130) and SIGTERM (143): one '<prog>: interrupted' / 'terminated' line, after the cleanup of whatever
  the body was writing (SIGTERM raises, as SIGINT does).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from megatron_ls.errors import UserError
from megatron_ls.tool_signals import Terminated, sigterm_raises, stop_line


def error_text(e: BaseException) -> str:
    """The message of a UserError, or of an OSError with the file it names."""
    if isinstance(e, OSError) and not isinstance(e, UserError):
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return str(e)


def run_cli(body: Callable[[], object], prog: str, error_prefix: str = "error: ", stop_note: str = "",
            stop_text: Callable[[BaseException], str] | None = None) -> int:
    """Exit status of a command-line tool's body (see the module's docstring). ``stop_note`` ends the line of a
    stop signal unless the body's output was already written in full (``published`` on the exception);
    ``stop_text`` replaces that line whole."""
    try:
        with sigterm_raises():
            body()
    except (UserError, OSError) as e:
        print(f"{error_prefix}{error_text(e)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as e:
        line, status = stop_line(prog, e)
        line += "" if getattr(e, "published", False) else stop_note
        print(stop_text(e) if stop_text else line, file=sys.stderr)
        return status
    return 0
