"""The smallest flag set pretrain_char_lm.py accepts, and the finalized arguments of it plus extras."""

from __future__ import annotations

import argparse

from megatron_ls.training.arguments import finalize_args, parse_args

BASE = ["--data-path", "d/p", "--seq-length", "64", "--train-iters", "10", "--num-layers", "2", "--hidden-size",
        "32", "--num-attention-heads", "2", "--window-size", "16", "--chunk-size", "8"]


def args_of(*extra: str, world: int = 1) -> argparse.Namespace:
    return finalize_args(parse_args(BASE + list(extra)), world_size=world)
