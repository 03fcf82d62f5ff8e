"""The official Transformer-LS attention layer (NVIDIA/transformer-ls), loaded from its source for side-by-side timing.

The layer is not part of this project and not installed: pass the path of `autoregressive/model_lib/layer.py` from a
checkout of https://github.com/NVIDIA/transformer-ls (see BENCHMARKS.md). It imports fairseq's LayerNorm, which is
torch's LayerNorm plus an `export` flag; the loader replaces that one import with torch's LayerNorm, nothing else.
Inputs are built the way the official model (autoregressive/model_lib/model.py) builds them.
"""

from __future__ import annotations

import os
import types

import torch

FAIRSEQ_IMPORT = "from fairseq.modules.layer_norm import LayerNorm"
TORCH_LAYER_NORM = '''
import torch.nn as _nn


def LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, export=False):  # fairseq's signature
    return _nn.LayerNorm(normalized_shape, eps=eps, elementwise_affine=elementwise_affine)
'''


class OfficialLayerError(Exception):
    """The given file is not the official layer this benchmark knows how to load."""


def load_official_layer(path: str) -> types.ModuleType:
    """Execute the official layer.py with fairseq's LayerNorm replaced by torch's; returns the module."""
    if not os.path.isfile(path):
        raise OfficialLayerError(f"--official-layer {path}: no such file")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    if FAIRSEQ_IMPORT not in source or "class ChunkedLSAttention" not in source:
        raise OfficialLayerError(f"--official-layer {path}: not NVIDIA/transformer-ls "
                                 f"autoregressive/model_lib/layer.py (no '{FAIRSEQ_IMPORT}' or no ChunkedLSAttention)")
    module = types.ModuleType("transformer_ls_official_layer")
    module.__file__ = path
    exec(compile(source.replace(FAIRSEQ_IMPORT, TORCH_LAYER_NORM), path, "exec"), module.__dict__)
    return module


def _sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The official PositionalEmbedding: [sin, cos] of positions * 10000^(-2i/dim), shape (1, len, dim)."""
    inv_freq = 1 / (10000 ** (torch.arange(0.0, dim, 2.0) / dim))
    angles = torch.outer(positions, inv_freq)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)[None]


class OfficialAttention(torch.nn.Module):
    """ChunkedLSAttention with the position tables and chunk mask of the official model, for (x, memory)."""

    def __init__(self, module: types.ModuleType, d_model: int, n_head: int, chunk: int, rank: int, window: int,
                 n: int, m: int) -> None:
        super().__init__()
        self.attn = module.ChunkedLSAttention(d_model=d_model, n_head=n_head, chunk_size=chunk, chunk_rank=rank,
                                              window_len=window, dropout=0.0, grad_chk=False, use_bias=False)
        n_chunks, n_mem_chunks = (m + n) // chunk, m // chunk
        mask = torch.triu(torch.ones(n // chunk, n_chunks, dtype=torch.bool), diagonal=n_mem_chunks)
        mask = mask[None, None, :, None, :, None].expand(-1, -1, -1, -1, -1, rank)
        self.register_buffer("chunk_mask", mask.contiguous().view(1, 1, -1, 1, n_chunks * rank))
        self.register_buffer("pos_chunks", _sinusoid(torch.arange(n_chunks * rank - 1, -1, -1.0), d_model))
        self.register_buffer("pos_window", _sinusoid(torch.arange(window - 1, -1, -1.0), d_model))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.attn(x, memory, self.pos_chunks, self.pos_window, self.chunk_mask)
