"""Long-short attention (Transformer-LS, Zhu et al. 2021) as a pure function on local heads.

Contract of `long_short_attention` (every implementation: reference, blocked, fused)
-----------------------------------------------------------------------------------------
Notation: B batch, H heads held by this rank, N segment length, M memory length, dh head
width, w window, c chunk, r landmarks per chunk. X = [memory ; segment], positions 0..M+N-1;
query i of the segment sits at position t = M + i.

    q            (B, H, N, dh)   segment queries, NOT scaled (scaled by softmax_scale, default dh**-0.5)
    k_win, v_win (B, H, P+N, dh) window keys / values of positions M-P .. M+N-1, P = min(M, w-1),
                                 after DualLN's first LayerNorm
    k_lm, v_lm   (B, H, (M+N)/c*r, dh) landmarks of every chunk of X, chunk-major (landmark l is
                                 number l % r of chunk l // r), after DualLN's second LayerNorm;
                                 0 landmarks = window attention only (attention_type "window")
    pos_bias_u   (H, dh)         Transformer-XL content bias u (window scores only)
    pos_bias_v   (H, dh)         Transformer-XL position bias v (window scores only)
    r_win        (H, w, dh)      R_w(d), the projected sinusoid of window distance d = 0..w-1
    r_lm         (H, n_dist, dh) R_c(d), landmark distance d = 0..n_dist-1; larger distances use the
                                 last row, which is how max_landmark_distance clamps
    returns      (B, H, N, dh)   attention output per head (before the output projection)

Scores of query t (q^ = q * scale):
- window key s, t - w < s <= t, s >= 0 (own position included):
      (q^ + u) . k_s + (q^ + v) . R_w(t - s)
- landmark of chunk j, for every chunk j < chunk(t) = t // c (memory chunks included; the
  query's own chunk is covered by the window since w >= c):
      q^ . k_j + q^ . R_c(d),  d = chunk(t) - 1 - j  (0 = the most recent completed chunk;
      the r landmarks of one chunk share d), clamped to n_dist - 1.
ONE softmax over [visible landmarks ; window keys] (fp32 for half types), dropout on the
probabilities (dropout_p, the caller decides train/eval and forks the TP RNG), output =
probabilities times the matching values. Masking uses a finite large negative number; a row
is never fully masked because the own position is always visible.

How the inputs are made (megatron_ls.model.long_short_attention): K = X Wk, V = X Wv (raw
projections), window keys/values = LN1(K), LN1(V); landmarks: P = softmax over the c positions
of X_j Wp (r rows per head), landmark k = LN2(P K_j), v = LN2(P V_j). Memory chunks and
segment chunks use the same formula, so a chunk's landmark does not change when it moves
into memory. DualLN placement follows the official code (window k/v through one LayerNorm,
compressed k/v through the other, both over the full width D).
"""

from megatron_ls.model.attention.blocked import long_short_attention_blocked
from megatron_ls.model.attention.common import landmark_distance_rows
from megatron_ls.model.attention.dispatch import auto_impl, fused_available, long_short_attention, resolve_impl
from megatron_ls.model.attention.full import full_attention, full_attention_dense
from megatron_ls.model.attention.reference import long_short_attention_reference

__all__ = [
    "long_short_attention",
    "long_short_attention_reference",
    "long_short_attention_blocked",
    "full_attention",
    "full_attention_dense",
    "landmark_distance_rows",
    "fused_available",
    "auto_impl",
    "resolve_impl",
]
