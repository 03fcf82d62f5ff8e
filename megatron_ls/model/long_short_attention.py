"""The long-short self-attention layer: projections, DualLN, relative positions, output.

Tensor parallel the Megatron way: this rank holds H / tp heads. Wq, Wk, Wv, the dynamic
projection Wp (D -> H r, head-major), the sinusoid projections R_w, R_c and the u, v biases are
split by head; Wo is row-parallel (its all-reduce ends the TP region). DualLN normalises over
the full width D, so its statistics are reduced across the TP group (TensorParallelLayerNorm).
With attention_type "window" the landmark half is absent (the paper's short-term ablation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ls.model.attention import landmark_distance_rows, long_short_attention
from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.model.init import head_parameter, local_heads, output_init
from megatron_ls.model.landmarks import compress_landmarks_joint
from megatron_ls.model.positions import sinusoid_table
from megatron_ls.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelLayerNorm,
    normal_init,
)
from megatron_ls.parallel.mappings import copy_to_tensor_model_parallel_region
from megatron_ls.parallel.random import tensor_parallel_rng


class LongShortSelfAttention(nn.Module):
    def __init__(self, config: TransformerLSConfig) -> None:
        super().__init__()
        self.config = config
        D, H = config.hidden_size, config.num_attention_heads
        self.heads = local_heads(config)
        self.head_dim = D // H
        self.use_landmarks = config.attention_type == "long-short"
        init = normal_init(config.init_method_std)

        self.query = ColumnParallelLinear(D, D, init_method=init)
        self.key = ColumnParallelLinear(D, D, init_method=init)
        self.value = ColumnParallelLinear(D, D, init_method=init)
        self.r_win_net = ColumnParallelLinear(D, D, bias=False, init_method=init)
        self.pos_bias_u = head_parameter((H, self.head_dim), init)
        self.pos_bias_v = head_parameter((H, self.head_dim), init)
        self.ln_win = TensorParallelLayerNorm(D, eps=config.layernorm_epsilon)
        if self.use_landmarks:
            self.dproj = ColumnParallelLinear(D, H * config.chunk_rank, init_method=init)
            self.r_lm_net = ColumnParallelLinear(D, D, bias=False, init_method=init)  # R_c, like R_w: no bias
            self.ln_lm = TensorParallelLayerNorm(D, eps=config.layernorm_epsilon)
        self.dense = RowParallelLinear(D, D, init_method=output_init(config))
        self.dropout = nn.Dropout(config.dropout)
        # Set by the training engine (--recompute-granularity selective): rebuild the core's scores in the backward.
        self.recompute_core = False

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.heads, self.head_dim).transpose(1, 2)

    def positions(self, net: ColumnParallelLinear, n: int, like: torch.Tensor) -> torch.Tensor:
        table = sinusoid_table(n, self.config.hidden_size, like.device, like.dtype)
        return net(table).view(n, self.heads, self.head_dim).transpose(0, 1)  # (H_local, n, dh)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, impl: str | None = None) -> torch.Tensor:
        """x (B, N, D) normalised layer input; memory (B, M, D) normalised inputs of the previous M tokens."""
        cfg = self.config
        B, N, D = x.shape
        M = 0 if memory is None else memory.shape[1]
        cfg.check_segment(N, M)
        w, c, r = cfg.window_size, cfg.chunk_size, cfg.chunk_rank
        P = min(M, w - 1)

        q = self._heads(self.query(x))
        # K and V of the window span in one matmul; raw K, V go through DualLN's first norm.
        span = x if P == 0 else torch.cat([memory[:, M - P:], x], dim=1)
        kv_weight = torch.cat([self.key.weight, self.value.weight])
        kv_bias = torch.cat([self.key.bias, self.value.bias])
        kv = F.linear(copy_to_tensor_model_parallel_region(span), kv_weight, kv_bias)
        # DualLN's first norm on K and V in one call over [K | V] rows; the core reads both halves in place.
        k_win, v_win = (self._heads(t) for t in self.ln_win(kv.view(B, P + N, 2, -1)).unbind(2))
        r_win = self.positions(self.r_win_net, w, x)

        if self.use_landmarks:
            # Memory and segment chunks compressed apart (chunks never straddle them): no copy of [memory; x].
            compressed = [compress_landmarks_joint(copy_to_tensor_model_parallel_region(part), self.dproj.weight,
                                                   self.dproj.bias, kv_weight, kv_bias, heads=self.heads, chunk=c,
                                                   rank=r)
                          for part in ([x] if M == 0 else [memory, x])]
            kv_lm = compressed[0] if M == 0 else torch.cat(compressed, dim=1)
            # DualLN's second norm on the landmark keys and values in one call; the core reads both in place.
            k_lm, v_lm = (self._heads(t) for t in self.ln_lm(kv_lm).unbind(2))
            n_dist = landmark_distance_rows((M + N) // c, cfg.max_landmark_distance)
            r_lm = self.positions(self.r_lm_net, n_dist, x)
        else:
            k_lm = v_lm = q.new_zeros(B, self.heads, 0, self.head_dim)
            r_lm = q.new_zeros(self.heads, 0, self.head_dim)

        p = cfg.attention_dropout if self.training else 0.0
        with tensor_parallel_rng():  # probabilities are head-sharded: per-rank dropout stream
            out = long_short_attention(q, k_win, v_win, k_lm, v_lm, self.pos_bias_u, self.pos_bias_v, r_win, r_lm,
                                       window=w, chunk=c, chunk_rank=r, mem_len=M, dropout_p=p,
                                       impl=impl or cfg.attention_impl, recompute=self.recompute_core and self.training)
        out = out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)
        return self.dropout(self.dense(out))


def set_selective_recompute(model: nn.Module, on: bool) -> None:
    """Megatron's selective recomputation: every long-short core of `model` rebuilds its scores in the backward."""
    for module in model.modules():
        if isinstance(module, LongShortSelfAttention):
            module.recompute_core = on
