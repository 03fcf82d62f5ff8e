"""training/signals.py: SIGINT / SIGTERM in the training loop (save, then stop)."""

from __future__ import annotations

import os
import signal

from megatron_ls.training.signals import StopSignals


# ---- signals --------------------------------------------------------------------------------
def test_stop_signals_record_and_restore():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as s:
        assert not s.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.stop_requested() and s.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before
