"""Process start-up for every layout: the world from the launcher's environment, one layout check, the groups.

Every check that can fail runs before the first collective and depends only on the environment and the
arguments, which are identical on every rank: a bad layout raises the same ParallelConfigError on every
rank instead of leaving some ranks waiting in a collective.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ls.errors import ParallelConfigError
from megatron_ls.parallel import mpu
from megatron_ls.parallel.layout import ParallelLayout
from megatron_ls.training.op_build_guard import load_shm_op_guarded


@dataclass(frozen=True)
class Layout:
    """Where this process sits: the run's ParallelLayout, its coordinates in it, its device."""

    parallel: ParallelLayout
    rank: int
    local_rank: int
    device: torch.device
    backend: str

    tp = property(lambda self: self.parallel.tp)
    pp = property(lambda self: self.parallel.pp)
    dp = property(lambda self: self.parallel.dp)
    world_size = property(lambda self: self.parallel.world_size)
    tp_rank = property(lambda self: self.parallel.coordinates(self.rank).tp_rank)
    pp_rank = property(lambda self: self.parallel.coordinates(self.rank).pp_rank)
    dp_rank = property(lambda self: self.parallel.coordinates(self.rank).dp_rank)

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ParallelConfigError(f"environment variable {name}={value!r} is not an integer") from None


def world_from_env() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) as set by `deepspeed`, torchrun or mpirun; a plain `python` run is 1, 0, 0."""
    world = _env_int("WORLD_SIZE", _env_int("OMPI_COMM_WORLD_SIZE", 1))
    rank = _env_int("RANK", _env_int("OMPI_COMM_WORLD_RANK", 0))
    local = _env_int("LOCAL_RANK", _env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0))
    if world < 1 or not 0 <= rank < world:
        raise ParallelConfigError(f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world}")
    return world, rank, local


def layout_for(world_size: int, tp: int = 1, pp: int = 1, config=None, zero_stage: int = 0,
               sp: int = 1, sequence_parallel: bool = False) -> ParallelLayout:
    """ParallelLayout.build with the model's sizes (``config``: a TransformerLSConfig) when there is one."""
    sizes = {} if config is None else {"num_attention_heads": config.num_attention_heads,
                                       "ffn_hidden_size": config.ffn_hidden_size, "num_layers": config.num_layers}
    return ParallelLayout.build(world_size, tp, pp, zero_stage, sp, sequence_parallel=sequence_parallel, **sizes)


def _use_cuda() -> bool:
    return os.environ.get("DS_ACCELERATOR", "") != "cpu" and torch.cuda.is_available()


def _default_master() -> None:
    # A plain one-process `python` run has no launcher: give torch.distributed a local rendezvous.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def _unlink_deepspeed_shm(rank: int) -> None:
    """Remove the name of DeepSpeed's CPU all-reduce workspace once every rank has mapped it.

    DeepSpeed's shm comm op (all ranks on one host, LOCAL_SIZE == WORLD_SIZE) creates a ~69 MB /dev/shm file per
    rank and never unlinks it, so every run would leave RAM-backed files behind. The mappings outlive the name:
    after the barrier (every rank has opened its peers' files) unlinking loses nothing.
    """
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    dist.barrier()  # on every rank, whether or not DeepSpeed made the file, so no rank waits alone
    path = os.path.join("/dev/shm", name)
    try:
        os.unlink(path)
    except OSError:
        pass  # already gone or not ours: nothing to clean


def init_distributed(tp: int = 1, pp: int = 1, config=None, timeout_s: float | None = None,
                     layout: ParallelLayout | None = None) -> Layout:
    """Start torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA) and build the groups of ``layout``
    (the run's, validated once by the arguments) or of one built here from the degrees and ``config``.

    Safe to call when the process group already exists (torchrun users, tests): it is reused.
    """
    world, rank, local = world_from_env()
    if layout is None:  # before any collective: the same verdict on every rank
        layout = layout_for(world, tp, pp, config)
    elif layout.world_size != world:
        raise ParallelConfigError(f"the layout is for {layout.world_size} ranks, the launcher started {world}")

    import deepspeed

    backend = "nccl" if _use_cuda() else "gloo"
    if _use_cuda():
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local)):
            os.environ.setdefault(name, str(value))
        if world == 1:
            _default_master()
    if not _use_cuda():
        load_shm_op_guarded()  # a `lock` left by a killed start would make DeepSpeed's own load wait forever
    kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, **kwargs)
    if dist.get_world_size() != world:
        raise ParallelConfigError(f"torch.distributed has {dist.get_world_size()} ranks but WORLD_SIZE={world}")
    _unlink_deepspeed_shm(rank)

    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(layout=layout)
    return Layout(layout, rank=dist.get_rank(), local_rank=local, backend=backend,
                  device=torch.device("cuda", local) if _use_cuda() else torch.device("cpu"))
