"""Position encodings: Transformer-XL sinusoids (projected per layer) and rotary embeddings."""

from __future__ import annotations

import torch


def sinusoid(positions: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(len(positions), dim) = [sin(p f), cos(p f)], f = 10000^(-2i/dim) (Transformer-XL's table)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype or torch.get_default_dtype())


_TABLES: dict[tuple, torch.Tensor] = {}


def sinusoid_table(n: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """sinusoid(0 .. n-1), computed once per (dim, device, dtype) and grown on demand: every layer and call projects
    the same constant table (row p depends only on p, so the first n rows of a longer table are exactly it)."""
    key = (dim, str(device), dtype)
    table = _TABLES.get(key)
    if table is None or table.shape[0] < n:
        table = sinusoid(torch.arange(max(n, 2 * (0 if table is None else table.shape[0])), device=device), dim,
                         dtype=dtype)
        _TABLES[key] = table
    return table[:n]


def rotary(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+dh/2}) of x (..., S, dh) by position * 10000^(-2i/dh) (RoPE, half split)."""
    dh = x.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
