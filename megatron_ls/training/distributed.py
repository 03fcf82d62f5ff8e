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

from megatron_ls.parallel import mpu
from megatron_ls.parallel.mpu import ParallelConfigError, check_parallel_sizes
from megatron_ls.training.op_build_guard import load_shm_op_guarded


@dataclass(frozen=True)
class Layout:
    """Where this process sits: sizes and coordinates of the tensor / pipeline / data axes."""

    tp: int
    pp: int
    dp: int
    world_size: int
    rank: int
    local_rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    backend: str

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


def validate_layout(world_size: int, tp: int, pp: int, config=None) -> int:
    """All layout checks in one place (no communication); returns the data-parallel size.

    `config` is a TransformerLSConfig; with it the model-dependent rules are checked too.
    """
    dp = check_parallel_sizes(world_size, tp, pp)
    if config is None:
        return dp
    problems = []
    if config.num_attention_heads % tp:
        problems.append(f"tensor-model-parallel-size ({tp}) must divide num-attention-heads "
                        f"({config.num_attention_heads}): tensor parallelism splits heads")
    if config.ffn_hidden_size % tp:
        problems.append(f"tensor-model-parallel-size ({tp}) must divide ffn-hidden-size ({config.ffn_hidden_size})")
    if pp > config.num_layers:
        problems.append(f"pipeline-model-parallel-size ({pp}) must not exceed num-layers ({config.num_layers}): "
                        "every pipeline stage needs at least one transformer layer")
    if problems:
        raise ParallelConfigError("; ".join(problems))
    return dp


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


def init_distributed(tp: int = 1, pp: int = 1, config=None, timeout_s: float | None = None) -> Layout:
    """Validate the layout, start torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA), build the groups.

    Safe to call when the process group already exists (torchrun users, tests): it is reused.
    """
    world, rank, local = world_from_env()
    dp = validate_layout(world, tp, pp, config)  # before any collective: same verdict on every rank

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
    mpu.initialize_model_parallel(tp, pp)
    return Layout(tp=tp, pp=pp, dp=dp, world_size=world, rank=dist.get_rank(), local_rank=local,
                  tp_rank=mpu.get_tensor_model_parallel_rank(), pp_rank=mpu.get_pipeline_model_parallel_rank(),
                  dp_rank=mpu.get_data_parallel_rank(),
                  device=torch.device("cuda", local) if _use_cuda() else torch.device("cpu"), backend=backend)
