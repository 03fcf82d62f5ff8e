"""Incremental state of one long-short attention layer: window keys/values, landmarks, the open chunk.

For each layer the cache holds
- the DualLN-normalised keys and values of the last w positions (the window of the next query),
- the landmark keys and values (after DualLN's second norm) of the completed chunks still visible,
- the normalised layer inputs of the current, incomplete chunk, from which its landmark is made with
  the model's own `compress_landmarks` once its c-th position arrives.
A new token costs O(w + visible landmarks): one query against those keys, never a pass over the stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_ls.inference.buffers import TimeBuffer
from megatron_ls.model.attention.common import softmax_dtype
from megatron_ls.model.landmarks import compress_landmarks
from megatron_ls.model.long_short_attention import LongShortSelfAttention


class LongShortLayerCache:
    def __init__(self, attention: LongShortSelfAttention) -> None:
        self.attn = attention
        cfg = attention.config
        self.window, self.chunk, self.rank = cfg.window_size, cfg.chunk_size, cfg.chunk_rank
        self.clamp = cfg.max_landmark_distance
        self.heads, self.head_dim = attention.heads, attention.head_dim
        self.use_landmarks = attention.use_landmarks
        self.k_win, self.v_win = TimeBuffer(), TimeBuffer()
        self.win_first = 0  # position of the first row of the window buffers
        self.k_lm, self.v_lm = TimeBuffer(), TimeBuffer()
        self.lm_first = 0  # chunk index of the first landmark held
        self.chunks_done = 0
        self.pending: torch.Tensor | None = None  # (B, < c, D) normalised inputs of the open chunk
        self.next_pos = 0
        self._r_win: torch.Tensor | None = None
        self._r_lm: torch.Tensor | None = None
        self.last_keys = 0  # keys + landmarks the last query attended to (work counter for tests)
        # [Wk ; Wv] once: the decoder works on a frozen (eval) model.
        self._kv = (torch.cat([attention.key.weight, attention.value.weight]),
                    torch.cat([attention.key.bias, attention.value.bias]))

    # ---- weights ----------------------------------------------------------------------------
    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.heads, self.head_dim).transpose(1, 2)

    def _landmark_table(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        # R_c(d) for d < rows, grown by doubling; the row of distance d does not depend on the table size.
        if self._r_lm is None or self._r_lm.shape[1] < rows:
            n = max(rows, 2 * (0 if self._r_lm is None else self._r_lm.shape[1]), 16)
            if self.clamp is not None:
                n = min(n, self.clamp + 1)
            self._r_lm = self.attn.positions(self.attn.r_lm_net, n, like)
        return self._r_lm

    # ---- state updates ----------------------------------------------------------------------
    def extend(self, x: torch.Tensor) -> None:
        """Add the normalised inputs x (B, n, D) of the next n positions."""
        B, n, _ = x.shape
        kv_w, kv_b = self._kv
        tail = x[:, max(0, n - self.window):]  # older positions can never be in a window again
        if len(self.k_win) and tail.shape[1] < n:
            self._drop_window(len(self.k_win))
        if not len(self.k_win):
            self.win_first = self.next_pos + n - tail.shape[1]
        k, v = F.linear(tail, kv_w, kv_b).chunk(2, dim=-1)
        self.k_win.append(self._heads(self.attn.ln_win(k)))
        self.v_win.append(self._heads(self.attn.ln_win(v)))
        if self.use_landmarks:
            pending = x if self.pending is None else torch.cat([self.pending, x], dim=1)
            complete = pending.shape[1] // self.chunk * self.chunk
            if complete:
                k_lm, v_lm = compress_landmarks(pending[:, :complete], self.attn.dproj.weight, self.attn.dproj.bias,
                                                kv_w, kv_b, heads=self.heads, chunk=self.chunk, rank=self.rank)
                self.k_lm.append(self._heads(self.attn.ln_lm(k_lm)))
                self.v_lm.append(self._heads(self.attn.ln_lm(v_lm)))
                self.chunks_done += complete // self.chunk
            self.pending = pending[:, complete:] if complete < pending.shape[1] else None
        self.next_pos += n

    def _drop_window(self, n: int) -> None:
        n = min(n, len(self.k_win))
        self.k_win.drop_front(n)
        self.v_win.drop_front(n)
        self.win_first += n

    def evict(self, first_visible: int) -> None:
        """Forget what the query at `next_pos` (and every later one) cannot see."""
        keep_from = max(first_visible, self.next_pos - self.window + 1)
        if keep_from > self.win_first:
            self._drop_window(keep_from - self.win_first)
        first_chunk = first_visible // self.chunk
        if self.use_landmarks and first_chunk > self.lm_first:
            drop = min(first_chunk, self.chunks_done) - self.lm_first
            self.k_lm.drop_front(drop * self.rank)
            self.v_lm.drop_front(drop * self.rank)
            self.lm_first += drop

    # ---- the query --------------------------------------------------------------------------
    def attend(self, x: torch.Tensor, t: int, first_visible: int) -> torch.Tensor:
        """Attention output (B, 1, D) (after Wo) of the query at position t, its own k/v already added."""
        a = self.attn
        B = x.shape[0]
        q = self._heads(a.query(x)) * self.head_dim ** -0.5  # (B, H, 1, dh)
        if self._r_win is None:
            self._r_win = a.positions(a.r_win_net, self.window, x)  # (H, w, dh)
        s0 = max(first_visible, t - self.window + 1)
        k_win = self.k_win.view()[:, :, s0 - self.win_first: t + 1 - self.win_first]
        v_win = self.v_win.view()[:, :, s0 - self.win_first: t + 1 - self.win_first]
        nw = t + 1 - s0
        u, v = a.pos_bias_u[None, :, None, :], a.pos_bias_v[None, :, None, :]
        pos_win = torch.matmul(q + v, self._r_win.transpose(-1, -2))[..., :nw].flip(-1)  # distances nw-1 .. 0
        scores = torch.matmul(q + u, k_win.transpose(-1, -2)) + pos_win
        values = v_win
        n_lm = 0
        if self.use_landmarks:
            j0, j1 = first_visible // self.chunk, t // self.chunk  # visible chunks [j0, j1)
            if j1 > j0:
                k_lm = self.k_lm.view()[:, :, (j0 - self.lm_first) * self.rank: (j1 - self.lm_first) * self.rank]
                v_lm = self.v_lm.view()[:, :, (j0 - self.lm_first) * self.rank: (j1 - self.lm_first) * self.rank]
                dist = torch.arange(j1 - j0 - 1, -1, -1, device=x.device)
                if self.clamp is not None:
                    dist = dist.clamp(max=self.clamp)
                table = self._landmark_table(int(dist.max()) + 1, x)
                pos_lm = torch.matmul(q, table.transpose(-1, -2))  # (B, H, 1, rows)
                idx = dist.repeat_interleave(self.rank).expand(B, self.heads, 1, -1)
                s_lm = torch.matmul(q, k_lm.transpose(-1, -2)) + pos_lm.gather(-1, idx)
                scores = torch.cat([s_lm, scores], dim=-1)
                values = torch.cat([v_lm, v_win], dim=-2)
                n_lm = k_lm.shape[2]
        self.last_keys = n_lm + nw
        probs = F.softmax(scores.to(softmax_dtype(scores.dtype)), dim=-1).to(q.dtype)
        out = torch.matmul(probs, values).transpose(1, 2).reshape(B, 1, self.heads * self.head_dim)
        return a.dropout(a.dense(out))
