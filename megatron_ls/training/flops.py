"""Model FLOPs of one training step, analytic: what model FLOPs utilisation (MFU) is measured against.

Counts the useful multiply-adds (2 FLOPs each) of the forward pass as the model defines it: masked scores
(outside the window, landmarks not yet visible, the causal upper triangle) are not counted, whatever an
implementation computes; the backward is twice the forward and activation recomputation is not counted (the
usual MFU convention). Per layer, for a segment of N tokens with M of memory (T = M + N):

    long-short: q, o: 2 N D^2 each; k, v over the window span S = N + min(M, w-1): 4 S D^2; R_w: 2 w D^2;
                dynamic projection 2 T D H r; chunk compression 2 T H r D; landmark k, v 4 (T/c) r D^2; R_c 2 n D^2;
                per query t and each of its visible window keys and landmarks: 6 D (content score,
                position score, value).
    full:       q, o: 2 N D^2 each, k, v 4 T D^2, scores and values 4 D (M + t + 1) per query t.
    MLP:        4 N D F;  logits: 2 N D V.
"""

from __future__ import annotations

from megatron_ls.model.attention.common import landmark_distance_rows
from megatron_ls.model.config import TransformerLSConfig


def _visible(config: TransformerLSConfig, N: int, M: int) -> tuple[int, int]:
    """(window keys, landmarks) summed over the N queries of a segment."""
    w, c, r = config.window_size, config.chunk_size, config.chunk_rank
    window = sum(min(w, M + t + 1) for t in range(N))
    landmarks = sum((M + t) // c * r for t in range(N)) if config.attention_type == "long-short" else 0
    return window, landmarks


def layer_forward_flops(config: TransformerLSConfig, N: int, M: int) -> dict[str, int]:
    """Forward FLOPs of one layer for one sequence, by component."""
    D, F, H, w, c, r = (config.hidden_size, config.ffn_hidden_size, config.num_attention_heads, config.window_size,
                        config.chunk_size, config.chunk_rank)
    T = M + N
    out = {"q_o": 4 * N * D * D, "mlp": 4 * N * D * F}
    if config.attention_type == "full":
        out["k_v"] = 4 * T * D * D
        out["core"] = 4 * D * sum(M + t + 1 for t in range(N))
        return out
    S = N + min(M, w - 1)
    out["k_v"] = 4 * S * D * D
    out["r_win"] = 2 * w * D * D
    window, landmarks = _visible(config, N, M)
    out["core"] = 4 * D * window + 2 * D * window  # content + position scores (2 each), values
    if config.attention_type == "long-short":
        n_dist = landmark_distance_rows(T // c, config.max_landmark_distance)
        out["landmarks"] = 2 * T * D * H * r + 2 * T * H * r * D + 4 * (T // c) * r * D * D + 2 * n_dist * D * D
        out["core"] += 6 * D * landmarks
    return out


def training_flops(config: TransformerLSConfig, batch: int, N: int, M: int) -> int:
    """Model FLOPs of one training step on `batch` sequences (forward + backward = 3 x forward)."""
    per_layer = sum(layer_forward_flops(config, N, M).values())
    logits = 2 * N * config.hidden_size * config.vocab_size
    return 3 * batch * (config.num_layers * per_layer + logits)
