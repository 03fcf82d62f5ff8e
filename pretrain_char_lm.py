#!/usr/bin/env python
"""Pretrain a Transformer-LS character / byte language model.

    deepspeed --num_gpus 8 pretrain_char_lm.py --preset enwik8-12l --data-path data/enwik8/enwik8 ...
    deepspeed --hostfile hostfile pretrain_char_lm.py ...      # several nodes
    torchrun --nproc_per_node 2 pretrain_char_lm.py ...
    python pretrain_char_lm.py ...                             # one process

`python pretrain_char_lm.py --help` lists the flags (Megatron's names). Examples: examples/.
"""

import os
import signal
import sys

try:
    import megatron_ls  # noqa: F401
except ImportError:  # a checkout that was not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _stopped(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM while torch and DeepSpeed load (seconds), before main() installs its own handlers."""
    print(f"pretrain_char_lm.py: error: {'interrupted' if signum == signal.SIGINT else 'terminated'} while "
          "starting", file=sys.stderr)
    sys.exit(128 + signum)


if __name__ == "__main__":
    interactive = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # a background job ignores Ctrl-C
    signal.signal(signal.SIGTERM, _stopped)
    if interactive:
        signal.signal(signal.SIGINT, _stopped)
    from megatron_ls.training.loop import main

    if interactive:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
