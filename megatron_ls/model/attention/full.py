"""Full causal attention over [memory ; segment], the paper's `full` baseline.

Positions are rotary (applied by the caller to q and k), so the kernel is plain causal
attention and runs through SDPA (flash / memory-efficient on GPU). The query at segment
position i sees keys 0 .. P + i of the P + N keys (bottom-right aligned causal mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_ls.model.attention.common import softmax_dtype


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0,
                   softmax_scale: float | None = None) -> torch.Tensor:
    """q (B, H, N, dh); k, v (B, H, P + N, dh) -> (B, H, N, dh)."""
    N, S = q.shape[2], k.shape[2]
    mask = None
    if S != N:
        # Imported here: torch.nn.attention.bias pulls in torch._dynamo, about 2 s of every process's start.
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(N, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=S == N, dropout_p=dropout_p,
                                          scale=softmax_scale)


def full_attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                         softmax_scale: float | None = None) -> torch.Tensor:
    """The same with an explicit mask and softmax: the oracle for `full_attention`."""
    N, S, dh = q.shape[2], k.shape[2], q.shape[3]
    scores = torch.matmul(q, k.transpose(-1, -2)) * (softmax_scale if softmax_scale is not None else dh ** -0.5)
    i = torch.arange(N, device=q.device)[:, None] + (S - N)
    visible = torch.arange(S, device=q.device)[None, :] <= i
    scores = scores.to(softmax_dtype(scores.dtype)).masked_fill(~visible, float("-inf"))
    return torch.matmul(F.softmax(scores, dim=-1).to(q.dtype), v)
