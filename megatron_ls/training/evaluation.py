"""Validation during training: the valid split streamed in lanes with memory, as in training.

Each evaluation starts at the beginning of the split with empty memory (so evaluations at
different iterations are comparable). The engine keeps the evaluation memory apart from the
training memory ("eval" / "train" streams), so training continues exactly as without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from megatron_ls.data import LaneDataset
from megatron_ls.tool_signals import signal_hook


def eval_steps(dataset: LaneDataset, eval_iters: int) -> int:
    """-1 = one pass over the whole split (every lane to its end)."""
    return dataset.steps_per_epoch if eval_iters < 0 else min(eval_iters, dataset.steps_per_epoch)


def evaluate(engine: Any, make_dataset: Any, eval_iters: int,
             stop: Callable[[], bool] | None = None) -> tuple[float, int, float] | None:
    """(mean nats/token over all ranks' lanes, tokens counted, seconds); None when `stop` (asked before each
    step, agreed across ranks) says a stop signal came: the save that follows must not wait for a long pass."""
    t0 = time.monotonic()
    dataset: LaneDataset = make_dataset()
    engine.reset_memory("eval")
    total, count = 0.0, 0
    try:
        for _ in range(eval_steps(dataset, eval_iters)):
            signal_hook("training_eval")  # test hook: a signal arriving during an evaluation
            if stop is not None and stop():
                return None
            inputs, targets = dataset.next_batch()
            nats, n = engine.eval_step(inputs, targets)
            total += float(nats)
            count += int(n)
    finally:
        engine.reset_memory("eval")  # nothing of it is needed again (and checkpoints stay small)
    return total / max(count, 1), count, time.monotonic() - t0
