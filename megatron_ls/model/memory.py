"""The per-layer memory of a stream: the layer's inputs for the previous tokens, detached."""

from __future__ import annotations

import torch


def update_memory(memory: torch.Tensor | None, hidden: torch.Tensor, mem_length: int) -> torch.Tensor:
    """The last `mem_length` positions of [memory ; hidden], detached, as a fresh tensor (B, m, D).

    Shorter than mem_length while the stream is; always a multiple of the chunk size when the
    segment and the previous memory are.
    """
    hidden = hidden.detach()
    B, N, D = hidden.shape
    if mem_length == 0:
        return hidden.new_zeros(B, 0, D)
    if memory is None or memory.shape[1] == 0 or N >= mem_length:
        return hidden[:, N - min(N, mem_length):].clone()
    keep = min(memory.shape[1], mem_length - N)
    return torch.cat([memory[:, memory.shape[1] - keep:].detach(), hidden], dim=1)

