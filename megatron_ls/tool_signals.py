"""SIGINT / SIGTERM in the command-line tools (preprocess, convert, evaluate, generate).

- ``sigterm_raises()``: SIGTERM raises ``Terminated``, as SIGINT raises KeyboardInterrupt, so every
  ``finally`` / ``except BaseException`` cleanup runs (no temporary file is left behind);
- ``uninterruptible()``: around a publish (the few renames that must all happen or none) SIGINT and
  SIGTERM wait until it is done, then take effect with the new output complete;
- ``stop_line()``: the one line and the exit status of a tool stopped by either;
- ``stopping_while_loading()``: while an entry script imports torch / DeepSpeed (seconds, before its main()
  handles signals) Ctrl-C or SIGTERM end it with one line instead of a traceback or a silent kill;
- ``die_with_parent()``: a child process (on Linux) is killed when its parent dies, even by SIGKILL;
- ``signal_hook()``: a test hook that sends a signal at a named point (MEGATRON_LS_TEST_SIGNAL).

Only the standard library: the tools import this before anything heavy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Test hook only: POINT:NAME, e.g. "publish:TERM" sends SIGTERM to this process at the point "publish".
TEST_SIGNAL_ENV = "MEGATRON_LS_TEST_SIGNAL"


class Terminated(BaseException):
    """SIGTERM (a BaseException like KeyboardInterrupt: no ``except Exception`` swallows it)."""


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _restore(signum: int, handler: object) -> None:
    # None: the handler was not set from Python; the default is the nearest thing.
    signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not break the cleanup
    raise Terminated


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises Terminated (main thread only; elsewhere nothing changes)."""
    if not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        _restore(signal.SIGTERM, previous)


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done, then take effect (keep the block short).

    In the main thread their handlers only record them; in another thread (where Python cannot set
    handlers) they are blocked. When the block ends the first of them is delivered to the handler it
    would have met; the exception that raises carries ``published = True`` when the block itself
    completed (the output is whole: a tool can say so).

    The main thread does not block them: a process-directed signal that the main thread blocks goes to
    another thread (numpy's OpenBLAS workers, say), whose C handler can run after the block has ended and
    the handlers were restored, so the signal would be lost. Unblocked, the kernel gives it to the main
    thread, where the recording handler sees it before the block ends.
    """
    pending: list[int] = []
    main = _main_thread()
    handlers = {s: signal.signal(s, lambda signum, frame: pending.append(signum))
                for s in STOP_SIGNALS} if main else {}
    old_mask = None if main else signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    done = False
    try:
        yield
        done = True
    finally:
        if old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # one held back is delivered here
        for s, handler in handlers.items():
            _restore(s, handler)
        if pending:
            try:
                signal.raise_signal(pending[0])
            except BaseException as e:
                e.published = done
                raise


@contextlib.contextmanager
def stopping_while_loading(prog: str) -> Iterator[None]:
    """Within the block Ctrl-C / SIGTERM print '<prog>: interrupted|terminated while starting' and exit 130 / 143.
    Ctrl-C is left alone where it is ignored (a background job); the previous handlers return afterwards."""
    def stopped(signum: int, frame: object) -> None:
        word = "interrupted" if signum == signal.SIGINT else "terminated"
        print(f"{prog}: {word} while starting", file=sys.stderr, flush=True)
        # Not sys.exit: import code that catches BaseException (an optional dependency's probe) would swallow
        # the SystemExit and leave a half-imported module behind (numpy without its functions, say), and the
        # run would go on to fail with a traceback. Imports have written nothing, so nothing needs cleaning up.
        os._exit(128 + signum)

    stops = [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, stopped) for s in stops}
    try:
        yield
    finally:
        for s, handler in previous.items():
            _restore(s, handler)


def stop_line(prog: str, exc: BaseException) -> tuple[str, int]:
    """(the line, the exit status) of a tool stopped by KeyboardInterrupt (130) or Terminated (143)."""
    word, status = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
    if getattr(exc, "published", False):
        word += " (after its output was written in full)"
    return f"{prog}: {word}", status


def die_with_parent(parent_pid: int) -> None:
    """In a child process, first thing: on Linux the kernel kills it (SIGKILL) when its parent dies, so a parent
    killed without cleanup leaves no orphan working on; if PARENT_PID died already, it ends now. Elsewhere
    nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # no libc / prctl to be found: as on other platforms
        return
    if os.getppid() != parent_pid:  # the parent died before the prctl: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)


def signal_hook(point: str, pid: int | None = None) -> bool:
    """Test hook only: with MEGATRON_LS_TEST_SIGNAL=POINT:NAME send SIGNAME to this process (or to ``pid``)
    here. True when it fired."""
    where, _, name = os.environ.get(TEST_SIGNAL_ENV, "").partition(":")
    if where != point:
        return False
    os.kill(os.getpid() if pid is None else pid, getattr(signal, "SIG" + name))
    return True
