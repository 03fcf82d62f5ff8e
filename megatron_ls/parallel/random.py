"""Random-number streams for tensor parallelism.

Two streams, as in Megatron: the default generator, identical on the ranks of a TP group
(dropout on replicated activations must agree), and a tracked "model-parallel" stream seeded
by TP rank (dropout on head-sharded activations must differ). The tracker is DeepSpeed's own
when DeepSpeed is installed, so `deepspeed.checkpointing` restores it when it recomputes a
checkpointed layer; without DeepSpeed (inference) an equivalent local tracker is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatron_ls.parallel import mpu

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718  # DeepSpeed's and Megatron's offset, kept for bitwise parity with them
_SP_SEED_OFFSET = 1_000_003


class _LocalTracker:
    """DeepSpeed's CudaRNGStatesTracker contract, on the CPU generator."""

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.states_ = {}

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


_LOCAL = _LocalTracker()


def get_rng_tracker():
    """The tracker that activation checkpointing saves and restores."""
    try:
        from deepspeed.runtime.activation_checkpointing.checkpointing import get_cuda_rng_tracker
    except ImportError:
        return _LOCAL
    return get_cuda_rng_tracker()


def model_parallel_seed(seed: int) -> None:
    """Seed both streams: default = seed everywhere, tracked = seed + offset + TP rank."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    tracker = get_rng_tracker()
    tracker.reset()
    # One stream per holder of a share of the heads: TP ranks, and within them the SP ranks after the all-to-all
    # (so SP=K on one TP rank draws the attention dropout TP=K would).
    share = mpu.get_tensor_model_parallel_rank() * mpu.get_sequence_parallel_world_size() \
        + mpu.get_sequence_parallel_rank()
    tracker.add(MODEL_PARALLEL_RNG, seed + _TP_SEED_OFFSET + share)


def sequence_parallel_seed(seed: int) -> None:
    """After the model is built (every rank the same weights): a default stream of its own per SP rank, whose
    dropout acts on its own slice of the tokens. Nothing changes without sequence parallelism."""
    if mpu.get_sequence_parallel_world_size() > 1:
        torch.manual_seed(seed + _SP_SEED_OFFSET + mpu.get_sequence_parallel_rank())


def tensor_parallel_rng() -> contextlib.AbstractContextManager:
    """Fork into the tracked stream for dropout on sharded activations (default stream if unseeded)."""
    tracker = get_rng_tracker()
    if MODEL_PARALLEL_RNG in tracker.get_states():
        return tracker.fork(MODEL_PARALLEL_RNG)
    return contextlib.nullcontext()
