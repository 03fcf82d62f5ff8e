"""Segment-wise dynamic projection: compress each chunk of c positions into r landmarks per head.

For chunk j and head h, P = softmax over the c positions of (X_j Wp)^h (r rows), and the
landmark key / value are P K_j^h, P V_j^h with K = X Wk + bk, V = X Wv + bv. Because P's rows
sum to one, P (X W^T + b) = (P X) W^T + b exactly: we compress X first and then project the
(M+N) r / c compressed rows instead of all M+N rows, which is c / r times fewer FLOPs for the
memory. The result depends only on X_j, so memory and segment chunks get the same landmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compress_landmarks_joint(x: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor | None,
                             kv_weight: torch.Tensor, kv_bias: torch.Tensor | None, *, heads: int, chunk: int,
                             rank: int) -> torch.Tensor:
    """Landmark keys and values of every chunk of x side by side: (B, L/chunk*rank, 2, heads*dh), [k, v] per row
    (DualLN's second norm then normalises both in one call, and the kernels read them in place).

    x (B, L, D) with L a multiple of `chunk`; proj_weight (heads*rank, D) head-major rows;
    kv_weight (2*heads*dh, D) = [Wk ; Wv] rows of the local heads, kv_bias (2*heads*dh,).
    """
    B, L, D = x.shape
    n_chunks = L // chunk
    dh = kv_weight.shape[0] // (2 * heads)
    logits = F.linear(x, proj_weight, proj_bias).view(B, n_chunks, chunk, heads * rank)
    # Softmax over the chunk: torch computes half types in fp32 and rounds once, with no fp32 tensor in between.
    probs = F.softmax(logits, dim=2)
    probs = probs.transpose(2, 3)  # (B, n, heads*rank, c)
    compressed = torch.matmul(probs, x.view(B, n_chunks, chunk, D))  # (B, n, heads*rank, D)
    # Per head: its r compressed rows times its own rows of Wk and Wv, plus their biases.
    compressed = compressed.view(B * n_chunks, heads, rank, D).permute(1, 0, 2, 3).reshape(heads, -1, D)
    w = kv_weight.view(2, heads, dh, D).permute(1, 3, 0, 2).reshape(heads, D, 2 * dh)
    if kv_bias is None:
        kv = torch.bmm(compressed, w)
    else:
        kv = torch.baddbmm(kv_bias.view(2, heads, 1, dh).permute(1, 2, 0, 3).reshape(heads, 1, 2 * dh), compressed, w)
    kv = kv.view(heads, B, n_chunks * rank, 2, dh)
    return kv.permute(1, 2, 3, 0, 4).reshape(B, n_chunks * rank, 2, heads * dh)


def compress_landmarks(x: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor | None,
                       kv_weight: torch.Tensor, kv_bias: torch.Tensor | None, *, heads: int, chunk: int,
                       rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Landmark keys and values of every chunk of x, (B, L/chunk*rank, heads*dh) each, landmark-major (chunk, then
    rank): views of compress_landmarks_joint()."""
    kv = compress_landmarks_joint(x, proj_weight, proj_bias, kv_weight, kv_bias, heads=heads, chunk=chunk, rank=rank)
    return kv[:, :, 0], kv[:, :, 1]
