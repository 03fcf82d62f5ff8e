"""Shapes, checks and masking constants shared by the attention implementations."""

from __future__ import annotations

import torch

from megatron_ls.kernels.spec import LongShortGeometry, check_shapes, landmark_distance_rows  # noqa: F401


def neg_value(dtype: torch.dtype) -> float:
    """A finite 'minus infinity': exp() underflows to 0, sums of two never overflow, and a
    softmax row that contains its own position is never all-masked, so no NaN can appear."""
    return torch.finfo(dtype).min / 4


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax runs in fp32 for half types (and stays fp64 for the fp64 oracle)."""
    return torch.promote_types(dtype, torch.float32)


def check_long_short_shapes(q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, k_lm: torch.Tensor,
                            v_lm: torch.Tensor, pos_bias_u: torch.Tensor, pos_bias_v: torch.Tensor,
                            r_win: torch.Tensor, r_lm: torch.Tensor, *, window: int, chunk: int,
                            chunk_rank: int, mem_len: int) -> int:
    """Validate the core's inputs (kernels/spec.py); returns P, the window keys before the segment."""
    return check_shapes(q, k_win, v_win, k_lm, v_lm, pos_bias_u, pos_bias_v, r_win, r_lm,
                        LongShortGeometry(window, chunk, chunk_rank, mem_len))
