#!/usr/bin/env python
"""Pretrain a Transformer-LS character / byte language model.

    deepspeed --num_gpus 8 pretrain_char_lm.py --preset enwik8-12l --data-path data/enwik8/enwik8 ...
    deepspeed --hostfile hostfile pretrain_char_lm.py ...      # several nodes
    torchrun --nproc_per_node 2 pretrain_char_lm.py ...
    python pretrain_char_lm.py ...                             # one process

`python pretrain_char_lm.py --help` lists the flags (Megatron's names). Examples: examples/.
"""

import os
import sys

try:
    import megatron_ls  # noqa: F401
except ImportError:  # a checkout that was not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


if __name__ == "__main__":
    from megatron_ls.tool_signals import stopping_while_loading

    with stopping_while_loading("pretrain_char_lm.py: error"):  # torch and DeepSpeed load here: seconds
        from megatron_ls.cli.pretrain import main
    sys.exit(main())
