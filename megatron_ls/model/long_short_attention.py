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
from megatron_ls.parallel.sequence import heads_to_sequence, local_heads_slice, sequence_to_heads, sp_size
from megatron_ls.parallel.tensor_sequence import residual_dropout


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
        """x (B, N, D) normalised layer input; memory (B, M, D) normalised inputs of the previous M tokens.

        Under sequence parallelism (K ranks) x and memory are this rank's slices, (B, N/K, D) and (B, M/K, D);
        the core runs on the whole sequence of K-th of the heads (parallel/sequence.py).
        """
        if sp_size() > 1:
            return self._forward_sequence_parallel(x, memory, impl)
        cfg = self.config
        B, N, D = x.shape
        M = 0 if memory is None else memory.shape[1]
        cfg.check_segment(N, M)
        P = min(M, cfg.window_size - 1)

        q = self._heads(self.query(x))
        span = x if P == 0 else torch.cat([memory[:, M - P:], x], dim=1)
        k_win, v_win = (self._heads(t) for t in self._window_kv(span).unbind(2))  # the core reads them in place
        if self.use_landmarks:
            k_lm, v_lm = (self._heads(t) for t in self._landmarks([x] if M == 0 else [memory, x]).unbind(2))
        else:
            k_lm = v_lm = q.new_zeros(B, self.heads, 0, self.head_dim)
        out = self._core(q, k_win, v_win, k_lm, v_lm, M, slice(None), impl, like=x)
        out = out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)
        return residual_dropout(self.dropout, self.dense(out))

    def _kv_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.key.weight, self.value.weight]), torch.cat([self.key.bias, self.value.bias])

    def _window_kv(self, x: torch.Tensor) -> torch.Tensor:
        """K and V of every row of x in one matmul, through DualLN's first norm in one call over [K | V] rows:
        (B, L, 2, H_local dh)."""
        kv_weight, kv_bias = self._kv_weights()
        kv = F.linear(copy_to_tensor_model_parallel_region(x), kv_weight, kv_bias)
        return self.ln_win(kv.view(x.shape[0], x.shape[1], 2, -1))

    def _landmarks(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Landmark K and V of every chunk of the parts (memory and segment compressed apart: chunks never straddle
        them, and no copy of [memory; x]), through DualLN's second norm in one call: (B, L/c r, 2, H_local dh)."""
        cfg = self.config
        kv_weight, kv_bias = self._kv_weights()
        compressed = [compress_landmarks_joint(copy_to_tensor_model_parallel_region(part), self.dproj.weight,
                                               self.dproj.bias, kv_weight, kv_bias, heads=self.heads,
                                               chunk=cfg.chunk_size, rank=cfg.chunk_rank) for part in parts]
        return self.ln_lm(compressed[0] if len(compressed) == 1 else torch.cat(compressed, dim=1))

    def _core(self, q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, k_lm: torch.Tensor,
              v_lm: torch.Tensor, M: int, heads: slice, impl: str | None, like: torch.Tensor) -> torch.Tensor:
        """The long-short core on the heads ``heads`` of this TP rank's (all of them without SP): (B, h, N, dh)."""
        cfg = self.config
        w, c, r = cfg.window_size, cfg.chunk_size, cfg.chunk_rank
        N = q.shape[2]
        r_win = self.positions(self.r_win_net, w, like)[heads]
        if self.use_landmarks:
            n_dist = landmark_distance_rows((M + N) // c, cfg.max_landmark_distance)
            r_lm = self.positions(self.r_lm_net, n_dist, like)[heads]
        else:
            r_lm = q.new_zeros(q.shape[1], 0, self.head_dim)
        p = cfg.attention_dropout if self.training else 0.0
        with tensor_parallel_rng():  # probabilities are head-sharded: per-rank dropout stream
            return long_short_attention(q, k_win, v_win, k_lm, v_lm, self.pos_bias_u[heads], self.pos_bias_v[heads],
                                        r_win, r_lm, window=w, chunk=c, chunk_rank=r, mem_len=M, dropout_p=p,
                                        impl=impl or cfg.attention_impl,
                                        recompute=self.recompute_core and self.training)

    def _forward_sequence_parallel(self, x: torch.Tensor, memory: torch.Tensor | None,
                                   impl: str | None) -> torch.Tensor:
        """DeepSpeed-Ulysses: projections, DualLN and landmark compression on this rank's tokens (whole chunks),
        then one all-to-all per kind of tensor to the whole sequence of this rank's heads, the core, and back."""
        cfg = self.config
        K = sp_size()
        B, n, D = x.shape
        m = 0 if memory is None else memory.shape[1]
        N, M = n * K, m * K
        cfg.check_segment(N, M)
        P = min(M, cfg.window_size - 1)

        def per_head(kv: torch.Tensor) -> torch.Tensor:  # (B, L, 2, H dh) -> (B, L, H, 2 dh): [k | v] per head
            return kv.view(B, kv.shape[1], 2, self.heads, self.head_dim).transpose(2, 3).reshape(
                B, kv.shape[1], self.heads, 2 * self.head_dim)

        def to_heads(t: torch.Tensor) -> torch.Tensor:  # (B, L/K, H, d) -> (B, H/K, L, d)
            return sequence_to_heads(t).transpose(1, 2)

        q_k_v = to_heads(torch.cat([self.query(x).view(B, n, self.heads, -1), per_head(self._window_kv(x))], -1))
        q, k_win, v_win = q_k_v.split(self.head_dim, dim=-1)
        if P:  # the window's keys before the segment: the memory's last P positions
            kv_mem = to_heads(per_head(self._window_kv(memory)))
            k_mem, v_mem = kv_mem[:, :, M - P:].split(self.head_dim, dim=-1)
            k_win, v_win = torch.cat([k_mem, k_win], dim=2), torch.cat([v_mem, v_win], dim=2)
        if self.use_landmarks:  # memory chunks' landmarks first, then the segment's, each in rank order
            lms = [to_heads(per_head(self._landmarks([part]))) for part in ([memory] if m else []) + [x]]
            k_lm, v_lm = torch.cat(lms, dim=2).split(self.head_dim, dim=-1)
        else:
            k_lm = v_lm = q.new_zeros(B, q.shape[1], 0, self.head_dim)
        out = self._core(q.contiguous(), k_win.contiguous(), v_win.contiguous(), k_lm.contiguous(),
                         v_lm.contiguous(), M, local_heads_slice(self.heads), impl, like=x)
        out = heads_to_sequence(out.transpose(1, 2)).reshape(B, n, self.heads * self.head_dim)
        return residual_dropout(self.dropout, self.dense(out))


def set_selective_recompute(model: nn.Module, on: bool) -> None:
    """Megatron's selective recomputation: every long-short core of `model` rebuilds its scores in the backward."""
    for module in model.modules():
        if isinstance(module, LongShortSelfAttention):
            module.recompute_core = on
