"""Small cross-rank agreements the loop needs (no-ops in a single process)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from megatron_ls.errors import UserError, by_name

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on at least one."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_over_ranks(value: int) -> int:
    """The sum of ``value`` over every rank (int64)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Destroy the process group before the interpreter exits.

    Left to interpreter teardown, gloo's background threads can be destroyed while still joinable and the
    process aborts ("terminate called without an active exception", exit -6) after its error message.
    Local only: safe when the other ranks have already exited or are exiting on the same error.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def agree(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on every rank; if it raises a UserError on any, raise the same kind on all.

    For local work between collectives (reading this rank's files): a rank that fails alone
    would otherwise leave the others blocked in the next collective.
    """
    result: T | None = None
    failure: tuple[str, str] | None = None
    try:
        result = fn()
    except UserError as e:
        if not is_distributed():
            raise
        failure = (type(e).__name__, str(e))
    if not is_distributed():
        return result  # type: ignore[return-value]
    failures: list[tuple[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    failed = [(r, f) for r, f in enumerate(failures) if f]
    if failed:
        rank, (kind, first) = failed[0]
        kind, mine = failure or (kind, f"{what} failed on rank {rank}: {first}")
        raise by_name(kind)(mine)
    return result  # type: ignore[return-value]
