"""Resume ZeRO 1-3 partitions into a DP x SP group of another size, through DeepSpeed's universal checkpoint.

DeepSpeed 0.19.8 loads a ZeRO checkpoint only into a group of the size that saved it ("Automatic adjustment of
ZeRO's optimizer state partitioning with a new world size is not currently supported"). Its universal format
(deepspeed.checkpoint.ds_to_universal) holds each parameter's fp32 master weights and Adam moments whole, and an
engine loading it (the `checkpoint.load_universal` setting) cuts its own partition out of them. So rank 0
converts the checkpoint into a hidden folder beside it, every rank loads from there, and the folder is removed
after the load. The checkpoint itself is only read; a crash leaves at most the hidden folder, which the next
conversion replaces.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
from typing import Any

from megatron_ls.errors import CheckpointError

from .checkpointing import load_engine_state
from .collectives import agree, barrier, global_rank

UNIVERSAL_SUFFIX = ".universal"


def partitioned(args: Any) -> bool:
    """Whether ZeRO partitions this run's optimizer state over DP x SP (bf16 with pipelines, which partitions it
    too, is refused before: sp_reshard.check_sp_reshard)."""
    return args.layout.zero_stage > 0


def universal_folder(path: str) -> str:
    """Where the universal copy of checkpoint ``path`` is written: hidden, so no tag scan ever takes it."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{UNIVERSAL_SUFFIX}")


def convert_to_universal(path: str) -> str:
    """Write the universal copy of checkpoint ``path`` (one process); returns its folder."""
    from deepspeed.checkpoint import ds_to_universal

    out = universal_folder(path)
    partial = out + ".partial"
    for stale in (out, partial):
        shutil.rmtree(stale, ignore_errors=True)
    args = argparse.Namespace(input_folder=path, output_folder=partial, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its progress bars and prints
            ds_to_universal.main(args)
        os.rename(partial, out)
    except Exception as e:  # noqa: BLE001 - the converter asserts and raises many kinds
        shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(f"DeepSpeed could not convert {path} to its universal format to repartition ZeRO's "
                              f"state: {type(e).__name__}: {e}") from None
    return out


def load_universal(engine: Any, path: str) -> None:
    """Collective. Load checkpoint ``path`` into ``engine`` through its universal copy: the weights, the
    optimizer state cut for this DP x SP group, the scheduler and DeepSpeed's counters."""
    agree(lambda: convert_to_universal(path) if global_rank() == 0 else None, "converting the checkpoint")
    folder = universal_folder(path)
    try:
        load_engine_state(engine, folder, finetune=False, universal=True)
    finally:
        barrier()
        if global_rank() == 0:
            shutil.rmtree(folder, ignore_errors=True)
