"""SIGTERM / SIGINT: finish the current step, save, exit 0 (what a cluster's pre-emption needs).

The handler only records the request; the loop asks ``stop_requested`` after each step, which
agrees across ranks (a max all-reduce) so every rank saves the same iteration even when the
signal reached only some of them. A second SIGINT while stopping raises KeyboardInterrupt.
"""

from __future__ import annotations

import signal
from types import FrameType


class StopSignals:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def stop_requested(self) -> bool:
        """True on every rank if any rank received a signal."""
        from .collectives import any_rank

        return any_rank(self.received is not None)
