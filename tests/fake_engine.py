"""A stand-in for DeepSpeed's engine in checkpoint-writing tests: its save as far as the ranks' agreement goes."""

from __future__ import annotations

import errno
import os

import torch
import torch.distributed as dist

from megatron_ls.training import checkpointing as ckpt


class FakeEngine:
    """DeepSpeed's save as far as the ranks' agreement goes: files first, its closing barrier last."""

    def __init__(self, value: float = 0.0, fail_rank: int | None = None) -> None:
        self.value, self.fail_rank = value, fail_rank

    def save_checkpoint(self, save_dir, tag, client_state=None, save_latest=True):
        assert not save_latest  # `latest` is ours to write, once the checkpoint is complete
        rank = dist.get_rank() if dist.is_initialized() else 0
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        if rank == self.fail_rank:
            raise OSError(errno.ENOSPC, "No space left on device")
        torch.save({"w": torch.tensor([self.value])},
                   os.path.join(save_dir, tag, f"mp_rank_{rank:02d}_model_states.pt"))
        if dist.is_initialized():
            dist.barrier()

    def load_checkpoint(self, load_dir, tag, load_optimizer_states=True, load_module_only=False, universal=False):
        self.value = float(torch.load(os.path.join(load_dir, tag, "mp_rank_00_model_states.pt"))["w"][0])
        return load_dir, {}


def saved(d: str, *iterations: int) -> None:
    """Complete checkpoints at these iterations in d, as a run saves them."""
    for it in iterations:
        ckpt.save_checkpoint(FakeEngine(it), d, it, {}, {"model": {}, "run": {}})
