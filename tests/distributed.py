"""Run a test function in several gloo processes, each with a hard timeout.

A hang fails the test instead of stalling CI: the parent waits with a deadline, kills every
child on expiry, and reports each rank's traceback on failure.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    try:
        import torch
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 180.0) -> None:
    """Call fn(rank, world_size, *args) in `world_size` processes; raise on failure or timeout."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errors), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    import time
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    messages = []
    while not errors.empty():
        rank, tb = errors.get()
        messages.append(f"--- rank {rank} ---\n{tb}")
    if hung:
        raise TimeoutError(f"ranks {hung} still running after {timeout:.0f} s (hang?)\n" + "\n".join(messages))
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if failed or messages:
        raise RuntimeError(f"ranks {failed} failed\n" + "\n".join(messages))
