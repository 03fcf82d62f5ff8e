"""pretrain_char_lm.py: train a Transformer-LS character / byte LM (the run itself is training/loop.py).

Exit status: 0 done (or stopped by a signal after saving), 1 a user-fixable error or a lost rank, 130 Ctrl-C,
143 SIGTERM outside the training loop (whose own handler saves first). Every rank prints its own one line,
prefixed with its rank when there are several.
"""

from __future__ import annotations

import os

from megatron_ls.cli.runner import run_cli
from megatron_ls.errors import TrainingError
from megatron_ls.tool_signals import Terminated
from megatron_ls.training.collectives import shutdown
from megatron_ls.training.launcher_watch import LauncherWatch
from megatron_ls.training.loop import train

PROG = "pretrain_char_lm.py"


def _peer_lost(e: BaseException) -> bool:
    """A collective failed because another rank went away (gloo: "Connection reset by peer"; NCCL: DistError)."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistError", RuntimeError)) or (isinstance(e, RuntimeError) and (
        "Connection reset by peer" in text or "Connection closed by peer" in text or "gloo" in text.lower()))


def error_prefix() -> str:
    """What each rank's line starts with: '[rank R] pretrain_char_lm.py: error: ' (no rank in one process)."""
    rank, world = os.environ.get("RANK"), int(os.environ.get("WORLD_SIZE", "1"))
    return (f"[rank {rank}] " if rank is not None and world > 1 else "") + f"{PROG}: error: "


def _stop_text(e: BaseException) -> str:
    if isinstance(e, Terminated):
        return f"{error_prefix()}terminated (SIGTERM) outside the training loop: nothing was saved"
    return f"{error_prefix()}interrupted"


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        # The training loop's StopSignals takes SIGTERM over while it runs; the launcher watch turns the death
        # of a launcher (the `deepspeed` command killed alone) into a SIGTERM to this rank.
        with LauncherWatch():
            try:
                train(argv)
            except RuntimeError as e:
                if not _peer_lost(e):
                    raise
                raise TrainingError("a collective failed: another rank stopped or lost its connection (see that "
                                    f"rank's log); {str(e).splitlines()[0][:300]}") from None

    try:
        return run_cli(body, PROG, error_prefix=error_prefix(), stop_text=_stop_text)
    finally:
        shutdown()
