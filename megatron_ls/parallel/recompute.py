"""Activation checkpointing through `deepspeed.checkpointing`, with the TP RNG tracker.

DeepSpeed's checkpoint saves the default generator and the model-parallel tracker's states
before the forward and restores them for the recompute, so dropout masks match exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_ls.parallel import mpu


def configure_activation_checkpointing(num_layers: int | None = None, partition_activations: bool = False) -> None:
    """Point deepspeed.checkpointing at our mpu (call once after the groups exist)."""
    import deepspeed

    deepspeed.checkpointing.configure(mpu, partition_activations=partition_activations,
                                      num_checkpoints=num_layers)


def checkpoint(function: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """Recompute `function` in the backward instead of storing its activations."""
    import deepspeed

    if not deepspeed.checkpointing.is_configured():
        configure_activation_checkpointing()
    return deepspeed.checkpointing.checkpoint(function, *args)
