"""Causal sliding-window attention through FlexAttention: the `window` baseline of bench/attention.py.

The anchor's "sliding window 512 only, FlexAttention" row (shared/ANCHORS.md): plain softmax attention of each
query over the last w keys of [memory ; segment], its own position included, no landmarks and no relative-position
term (positions come from the caller's rotary embedding, as in `full`). FlexAttention skips the key blocks the mask
leaves empty, so the cost grows with N w, not N (M + N). It has no backward on the CPU; on CUDA it runs compiled.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def _block_mask(window: int, n_queries: int, n_keys: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = n_keys - n_queries  # query i sits at key position offset + i (bottom-right aligned)

    def visible(b, h, q_idx, kv_idx):
        t = q_idx + offset
        return (kv_idx <= t) & (kv_idx > t - window)

    return create_block_mask(visible, B=None, H=None, Q_LEN=n_queries, KV_LEN=n_keys, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int,
                             dropout_p: float = 0.0, softmax_scale: float | None = None) -> torch.Tensor:
    """q (B, H, N, dh); k, v (B, H, P + N, dh) -> (B, H, N, dh): query i sees keys P+i-w < s <= P+i."""
    if dropout_p:
        raise ValueError("the FlexAttention sliding window has no attention dropout; use attention_dropout 0")
    from torch.nn.attention.flex_attention import flex_attention

    mask = _block_mask(window, q.shape[2], k.shape[2], str(q.device))
    fn = _compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=mask, scale=softmax_scale)
