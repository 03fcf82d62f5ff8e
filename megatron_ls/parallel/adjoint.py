"""Autograd Functions made of a communication and its adjoint: the gradient of an all-gather is a reduce-scatter
(or a split), of a copy an all-reduce, and so on. Megatron writes each pair out as a class of its own."""

from __future__ import annotations

from collections.abc import Callable

import torch

Op = Callable[[torch.Tensor], torch.Tensor]


def adjoint_pair(name: str, forward: Op, backward: Op) -> type[torch.autograd.Function]:
    """An autograd Function applying ``forward`` to its input and ``backward`` to the gradient."""
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(lambda ctx, x: forward(x)),
        "backward": staticmethod(lambda ctx, grad: backward(grad)),
    })
