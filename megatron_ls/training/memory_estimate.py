"""Analytic peak memory per GPU of a training layout: weights, gradients, optimizer, activations, memory cache.

Counts what this code base and DeepSpeed 0.19.8 actually allocate (checked by tests/training/test_memory_estimate.py):

- parameters: counted from the config exactly as the modules build them (TP shards, replicated norms and biases,
  the tied embedding on the first and the last pipeline stage).
- precision and ZeRO, per parameter of this rank (s = 2 for bf16/fp16, 4 for fp32; dp = data-parallel size):

      stage  parameters  gradients               optimizer (Adam)
      0      s           s (+4 fp32 copy, half)  8 (fp32) / 12 (half: fp32 master + 2 moments)
      1      s           s + 4/dp                12/dp (DeepSpeed keeps an fp32 master partition even in fp32)
      2      s           s/dp + 4/dp             12/dp
      3      s/dp        s/dp + 4/dp             12/dp

  plus ZeRO 1/2's gradient-reduction bucket (reduce_bucket_size elements, two with overlap_comm) and ZeRO 3's
  gathered parameters of one layer (+ its prefetch bucket).
- activations: the tensors autograd saves for the backward, per layer, counted the way the layer, the blocked
  core (CPU) or the fused kernel (CUDA), the MLP and the loss save them; with activation checkpointing only each
  layer's input plus one layer's worth during the recompute. Pipelines keep min(pp - stage, micro-batches)
  micro-batches in flight on a stage (1F1B).
- memory cache: per layer (B, M, D) per micro-batch of the step, plus the next segment's being written.
- workspace: one more layer's worth (the gradients flowing through the layer in its backward) and the loss's
  backward (the logits' gradient and its fp32 chunks).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from megatron_ls.model.attention.blocked_layout import Tiling, tiling
from megatron_ls.model.attention.common import landmark_distance_rows
from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.parallel.layout import ParallelLayout

GiB = 1024 ** 3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DEFAULT_REDUCE_BUCKET = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default (elements)
DEFAULT_PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size default (elements)
_STATS = 8  # LayerNorm's saved mean and rstd, fp32, per row


@dataclass(frozen=True)
class TrainingLayout:
    """How one training run is laid out over GPUs (what the estimate depends on besides the model)."""

    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    parallel: ParallelLayout = ParallelLayout(1)  # degrees and ZeRO stage
    checkpoint_activations: bool = False
    recompute_attention: bool = False  # --recompute-granularity selective
    precision: str = "fp32"  # fp32 | bf16 | fp16
    # What runs the long-short core: blocked (CPU), fused (CUDA) or fused-table (fused with the window position
    # table, MEGATRON_LS_WINDOW_POS=table: two B x H x N x w tables live during each layer's backward).
    attention_impl: str = "blocked"
    device: str = "cuda"  # cuda | cpu: CPU dropout keeps its mask in the activation dtype, CUDA as one byte
    reduce_bucket_size: int = DEFAULT_REDUCE_BUCKET
    overlap_comm: bool = False

    tp = property(lambda self: self.parallel.tp)
    pp = property(lambda self: self.parallel.pp)
    dp = property(lambda self: self.parallel.dp)
    zero_stage = property(lambda self: self.parallel.zero_stage)

    def as_dict(self) -> dict:
        """Flat: the degrees beside the other fields (what bench/memory.py tabulates)."""
        out = {k: v for k, v in self.__dict__.items() if k != "parallel"}
        return {**out, "tp": self.tp, "pp": self.pp, "dp": self.dp, "sp": self.parallel.sp,
                "zero_stage": self.zero_stage}

    def describe(self) -> str:
        ckpt = " ckpt" if self.checkpoint_activations else " selective" if self.recompute_attention else ""
        sp = f" SP{self.parallel.sp}" if self.parallel.sp > 1 else ""
        return (f"TP{self.tp}{sp} PP{self.pp} DP{self.dp} ZeRO-{self.zero_stage}{ckpt} micro {self.micro_batch_size}"
                f" x{self.grad_accum_steps} {self.precision}")


@dataclass
class MemoryEstimate:
    """Bytes per GPU on the most loaded pipeline stage."""

    params: int
    grads: int
    optimizer: int
    buffers: int
    activations: int
    memory_cache: int
    workspace: int
    stage: int = 0
    layers_on_stage: int = 0
    params_on_stage: int = 0
    detail: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return (self.params + self.grads + self.optimizer + self.buffers + self.activations + self.memory_cache
                + self.workspace)

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}

    def line(self, device_bytes: int | None = None) -> str:
        text = (f"memory estimate per rank (pipeline stage {self.stage}, {self.layers_on_stage} layers): "
                f"params {fmt_bytes(self.params)} + grads {fmt_bytes(self.grads)} + optimizer "
                f"{fmt_bytes(self.optimizer)} + buffers {fmt_bytes(self.buffers)} + activations "
                f"{fmt_bytes(self.activations)} + memory cache {fmt_bytes(self.memory_cache)} + workspace "
                f"{fmt_bytes(self.workspace)} = {fmt_bytes(self.total)}")
        if device_bytes is not None:
            text += f" of {fmt_bytes(device_bytes)}"
        return text


def fmt_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / 2**20:.1f} MiB"


# ---- parameters --------------------------------------------------------------------------------------------------
def layer_parameters(config: TransformerLSConfig, tp: int = 1) -> int:
    """Parameters of one transformer layer held by one TP rank (as the modules build them)."""
    D, F, H, r = config.hidden_size, config.ffn_hidden_size, config.num_attention_heads, config.chunk_rank
    Dl, Fl = D // tp, F // tp
    n = 2 * D + 2 * D  # ln_attn, ln_mlp (replicated)
    n += D * Dl + D  # output projection (row-parallel: split weight, replicated bias)
    n += Fl * D + Fl + D * Fl + D  # fc1 (column), fc2 (row)
    if config.attention_type == "full":
        return n + 3 * (Dl * D + Dl)
    n += 3 * (Dl * D + Dl) + Dl * D  # q, k, v, R_w
    n += 2 * Dl + 2 * Dl  # u, v biases; ln_win
    if config.attention_type == "long-short":
        n += (H * r // tp) * D + H * r // tp  # dynamic projection
        n += Dl * D + 2 * Dl  # R_c (no bias, like R_w), ln_lm
    return n


def embedding_parameters(config: TransformerLSConfig, tp: int = 1) -> int:
    return config.padded_vocab_size(tp) // tp * config.hidden_size


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Transformer layers per pipeline stage, as DeepSpeed's 'type:' partitioning splits them."""
    if pp == 1:
        return [num_layers]
    from deepspeed.runtime.utils import partition_balanced

    weights = [0] + [1] * num_layers + [0, 0]  # embedding, layers, final norm, output (model/pipeline.py)
    bounds = partition_balanced(weights, pp)
    return [sum(weights[bounds[i]:bounds[i + 1]]) for i in range(pp)]


def stage_parameters(config: TransformerLSConfig, tp: int, pp: int) -> list[int]:
    """Parameters per pipeline stage on one TP rank; the tied embedding sits on the first and the last stage."""
    emb = embedding_parameters(config, tp)
    per_layer = layer_parameters(config, tp)
    out = []
    for s, n_layers in enumerate(stage_layers(config.num_layers, pp)):
        n = n_layers * per_layer
        if s == 0:
            n += emb
        if s == pp - 1:
            n += 2 * config.hidden_size  # final LayerNorm
            if pp > 1 or not config.tie_embeddings:
                n += emb  # the tied copy of the last stage, or the untied output layer
        out.append(n)
    return out


def state_bytes(n_params: int, layout: TrainingLayout) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer) bytes for n_params parameters under the layout's precision and ZeRO."""
    s = DTYPE_BYTES[layout.precision]
    dp, z = layout.dp, layout.zero_stage
    shard = lambda per: math.ceil(n_params * per / dp)  # noqa: E731
    if z == 0:
        params = n_params * s
        grads = n_params * s + (n_params * 4 if s != 4 else 0)
        optimizer = n_params * (8 if s == 4 else 12)
    else:
        params = shard(s) if z == 3 else n_params * s
        grads = (shard(s) if z >= 2 else n_params * s) + shard(4)
        optimizer = shard(12)
    return params, grads, optimizer


def buffer_bytes(config: TransformerLSConfig, layout: TrainingLayout, n_params: int) -> int:
    """DeepSpeed's own allocations that scale with its bucket settings, not with the model."""
    s = DTYPE_BYTES[layout.precision]
    if layout.zero_stage in (1, 2):
        # ZeRO-1 reduces into an fp32 accumulator, ZeRO-2 into a low-precision one (stage_1_and_2.py).
        per = 4 if layout.zero_stage == 1 else s
        return layout.reduce_bucket_size * per * (2 if layout.overlap_comm else 1)
    if layout.zero_stage == 3:
        gathered = layer_parameters(config, layout.tp) * s  # the layer being computed, all-gathered
        prefetch = min(DEFAULT_PREFETCH_BUCKET, n_params) * s
        return gathered + prefetch + min(layout.reduce_bucket_size, n_params) * s
    return 0


# ---- activations -------------------------------------------------------------------------------------------------
def _layer_norm_saved(rows: int, width: int, s: int, tp: int) -> int:
    """Bytes a LayerNorm over `width` channels (TP-split when tp > 1) saves besides its input."""
    if tp == 1:
        return rows * _STATS
    # TensorParallelLayerNorm: centered and normalised values in fp32, rstd per row.
    return rows * (2 * width // tp * 4 + 4) + (rows * width // tp * 4 if s != 4 else 0)


def _blocked_tiling(B: int, N: int, M: int, Hl: int, config: TransformerLSConfig, landmarks: bool) -> Tiling:
    n_lm = (M + N) // config.chunk_size * config.chunk_rank if landmarks else 0
    return tiling(B, Hl, N, M, window=config.window_size, chunk=config.chunk_size, n_lm=n_lm)


def _group_scores(B: int, Hl: int, config: TransformerLSConfig, t: Tiling) -> list[int]:
    """Score elements of each group of the blocked core: rows x (visible landmarks + window tile)."""
    return [g.g * B * Hl * g.rows * (g.qmax * config.chunk_rank + t.L) for g in t.groups]


def blocked_core_bytes(B: int, N: int, M: int, Hl: int, dh: int, config: TransformerLSConfig, s: int,
                       landmarks: bool, recompute: bool = False) -> dict[str, int]:
    """What attention/blocked_core.py saves for the backward: block-major scaled queries, padded window keys and
    values, the output, R_w, and (unless `recompute`, selective recomputation) every group's probabilities in fp32."""
    t = _blocked_tiling(B, N, M, Hl, config, landmarks)
    n_blocks = math.ceil(N / t.b)
    rows = B * Hl * dh  # elements per position of one (B, H, ., dh) tensor
    out = {"core_q_out": 2 * n_blocks * t.b * rows * s, "core_kv": 2 * (n_blocks + t.shifts) * t.b * rows * s,
           "core_r_win": Hl * config.window_size * dh * s}
    if not recompute:
        out["core_probs"] = 4 * sum(_group_scores(B, Hl, config, t))
    return out


def blocked_recompute_workspace(B: int, N: int, M: int, Hl: int, dh: int, config: TransformerLSConfig,
                                s: int) -> int:
    """The transient of selective recomputation: the largest group's probabilities (fp32) and score gradients, plus
    its dropout mask and dropped probabilities with attention dropout."""
    t = _blocked_tiling(B, N, M, Hl, config, config.attention_type == "long-short")
    per_score = 4 + s + (1 + s if config.attention_dropout > 0 else 0)
    return per_score * max(_group_scores(B, Hl, config, t))


def layer_activation_bytes(config: TransformerLSConfig, B: int, N: int, M: int, tp: int = 1, precision: str = "fp32",
                           attention_impl: str = "blocked", device: str = "cuda",
                           recompute_attention: bool = False) -> dict[str, int]:
    """Bytes one layer saves for its backward, by tensor group (memory (B, M, D) itself excluded: it is the cache)."""
    s = DTYPE_BYTES[precision]
    D, F, H, w, c, r = (config.hidden_size, config.ffn_hidden_size, config.num_attention_heads, config.window_size,
                        config.chunk_size, config.chunk_rank)
    Dl, Fl, Hl, dh = D // tp, F // tp, H // tp, D // H
    drop = 0 if config.dropout == 0 else 1 if device == "cuda" else s  # dropout's mask (CPU: activation dtype)
    T = M + N
    a = {"ln_attn": B * N * D * s + B * T * _STATS, "qkv_input": B * N * D * s}
    a["out_proj_input"] = B * N * Dl * s
    a["attn_dropout_mask"] = drop * B * N * D
    a["ln_mlp"] = B * N * D * s + B * N * _STATS
    a["mlp"] = B * N * D * s + 2 * B * N * Fl * s + drop * B * N * (Fl + D)
    if config.attention_type == "full":
        if M:
            a["qkv_input"] += B * T * D * s  # [memory ; segment] for K and V
        a["core"] = B * N * Dl * s * 2 + B * T * Dl * s * 2 + B * Hl * N * 4  # q, k, v, out, logsumexp (flash)
        if M and device != "cuda":
            a["core"] += N * T * 4  # CPU SDPA materialises the lower-right causal mask and keeps it
        return a
    landmarks = config.attention_type == "long-short"
    P = min(M, w - 1)
    S = P + N
    a["kv_input"] = (B * S * D * s if P else 0) + 2 * Dl * D * s  # the window span and the [Wk; Wv] concatenation
    a["ln_win"] = B * S * 2 * Dl * s + 2 * _layer_norm_saved(B * S, D, s, tp)
    a["r_win"] = w * D * s
    if landmarks:
        nl = T // c * r
        n_dist = landmark_distance_rows(T // c, config.max_landmark_distance)
        a["landmarks"] = ((B * T * D * s if M else 0) + B * T * Hl * r * (4 + (s if s != 4 else 0))
                          + Hl * B * nl * D * s + 2 * Dl * D * s)  # stream, chunk softmax, compressed rows, W
        a["ln_lm"] = 2 * B * nl * Dl * s + 2 * _layer_norm_saved(B * nl, D, s, tp)
        a["r_lm"] = n_dist * D * s + n_dist * Dl * s
    if attention_impl.startswith("fused"):
        # The kernel keeps contiguous copies of q, window k/v, landmark k/v, the output and the row logsumexp.
        nl = T // c * r if landmarks else 0
        a["core"] = 2 * B * N * Dl * s + 2 * B * S * Dl * s + 2 * B * nl * Dl * s + B * Hl * N * 4 + Hl * w * dh * s
    else:
        if landmarks:
            a["ln_lm"] += 2 * B * (T // c * r) * Dl * s  # landmark keys and values, read by the core's matmuls
        a.update(blocked_core_bytes(B, N, M, Hl, dh, config, s, landmarks, recompute_attention))
    return a


def sequence_parallel_layer_bytes(config: TransformerLSConfig, B: int, N: int, M: int, tp: int, sp: int,
                                  precision: str, attention_impl: str, device: str,
                                  recompute_attention: bool) -> dict[str, int]:
    """A layer's saved bytes under sequence parallelism (K = sp ranks, DeepSpeed-Ulysses): everything but the core
    holds N/K tokens (and M/K of memory); the core holds the whole sequence of 1/K of the heads, plus the exchanged
    q / k / v / landmark tensors in head layout."""
    args = (precision, attention_impl, device, recompute_attention)
    if sp == 1:
        return layer_activation_bytes(config, B, N, M, tp, *args)
    token = layer_activation_bytes(config, B, N // sp, M // sp, tp, *args)
    heads = layer_activation_bytes(config, B, N, M, tp * sp, *args)
    core = {k: v for k, v in heads.items() if k.startswith("core")}
    out = {k: v for k, v in token.items() if not k.startswith("core")} | core
    s = DTYPE_BYTES[precision]
    P, Dk = min(M, config.window_size - 1), config.hidden_size // (tp * sp)
    lm = (M + N) // config.chunk_size * config.chunk_rank if config.attention_type == "long-short" else 0
    out["sp_exchanged"] = B * (3 * N + 2 * P + 2 * lm) * Dk * s + B * N * Dk * s  # in: q k v, memory k v, landmarks
    return out


def tensor_sequence_saving(layer: dict[str, int], config: TransformerLSConfig, B: int, N: int, tp: int, s: int,
                           device: str) -> dict[str, int]:
    """Megatron's sequence parallelism: the residual stream's LayerNorm inputs and dropout masks hold N/tp tokens
    (the gathered inputs of the TP regions stay whole: the linears keep them)."""
    drop = 0 if config.dropout == 0 else 1 if device == "cuda" else s
    out = dict(layer)
    for key in ("ln_attn", "ln_mlp", "attn_dropout_mask"):
        out[key] = layer[key] // tp
    out["mlp"] = layer["mlp"] - drop * B * N * config.hidden_size * (tp - 1) // tp
    return out


def head_activation_bytes(config: TransformerLSConfig, B: int, N: int, tp: int, precision: str,
                          first: bool, last: bool, device: str = "cuda") -> dict[str, int]:
    """Embedding (first stage) and final norm + logits + loss (last stage) saved tensors."""
    s = DTYPE_BYTES[precision]
    D, V = config.hidden_size, config.padded_vocab_size(tp) // tp
    out = {}
    if first:
        mask = 0 if config.dropout == 0 else 1 if device == "cuda" else s
        out["embedding"] = B * N * 8 + B * N * D * mask
    if last:
        out["final_norm"] = B * N * D * s + B * N * _STATS
        out["logits_input"] = B * N * D * s
        if tp == 1:  # the chunked loss keeps the logits themselves, the row logsumexp and the targets
            out["loss"] = B * N * V * s + B * N * (4 + 8)
        else:  # the vocab-parallel loss keeps its fp32 softmax, the targets and their local-range mask
            out["loss"] = B * N * V * 4 + B * N * (8 + 1)
    return out


def loss_workspace_bytes(config: TransformerLSConfig, B: int, N: int, tp: int, s: int) -> int:
    """Transient bytes of the loss's backward: the logits' gradient, plus fp32 chunks (TP=1) or copies (TP>1)."""
    from megatron_ls.parallel.cross_entropy import CHUNK_ELEMENTS

    V = config.padded_vocab_size(tp) // tp
    if tp == 1:
        return B * N * V * s + 2 * min(CHUNK_ELEMENTS, B * N * V) * 4
    return B * N * V * s + 2 * B * N * V * 4


# ---- the whole estimate ------------------------------------------------------------------------------------------
def estimate_memory(config: TransformerLSConfig, seq_length: int, mem_length: int | None,
                    layout: TrainingLayout) -> MemoryEstimate:
    """Peak bytes per GPU of training `config` on segments of `seq_length` tokens with `mem_length` of memory."""
    M = config.mem_length if mem_length is None else mem_length
    N, B, tp, pp, sp = seq_length, layout.micro_batch_size, layout.tp, layout.pp, layout.parallel.sp
    s = DTYPE_BYTES[layout.precision]
    selective = layout.recompute_attention and layout.attention_impl == "blocked" and config.attention_type != "full"
    layer = sequence_parallel_layer_bytes(config, B, N, M, tp, sp, layout.precision, layout.attention_impl,
                                          layout.device, selective)
    n_loc, m_loc, h_core = N // sp, M // sp, config.num_attention_heads // (tp * sp)  # per-rank tokens, core heads
    if layout.parallel.sequence_parallel:
        layer = tensor_sequence_saving(layer, config, B, N, tp, s, layout.device)
    layer_total = sum(layer.values())
    best = None
    for stage, (n_layers, n_params) in enumerate(zip(stage_layers(config.num_layers, pp),
                                                     stage_parameters(config, tp, pp))):
        first, last = stage == 0, stage == pp - 1
        head = head_activation_bytes(config, B, n_loc, tp, layout.precision, first, last, layout.device)
        in_flight = min(pp - stage, layout.grad_accum_steps) if pp > 1 else 1
        if layout.checkpoint_activations:
            per_micro = n_layers * B * n_loc * config.hidden_size * s + sum(head.values())
            activations = per_micro * in_flight + layer_total  # inputs kept, one layer recomputed
        else:
            activations = (n_layers * layer_total + sum(head.values())) * in_flight
        params, grads, optimizer = state_bytes(n_params, layout)
        cache = n_layers * (layout.grad_accum_steps + 1) * B * m_loc * config.hidden_size * s if M else 0
        workspace = layer_total + (loss_workspace_bytes(config, B, n_loc, tp, s) if last else 0)
        if selective:  # one group's scores and probabilities, rebuilt in the backward
            workspace += blocked_recompute_workspace(B, N, M, h_core,
                                                     config.hidden_size // config.num_attention_heads, config, s)
        if layout.attention_impl == "fused-table":  # the table and its gradient, both in the compute dtype
            workspace += 2 * B * h_core * N * config.window_size * s
        est = MemoryEstimate(params=params, grads=grads, optimizer=optimizer,
                             buffers=buffer_bytes(config, layout, n_params), activations=activations,
                             memory_cache=cache, workspace=workspace, stage=stage, layers_on_stage=n_layers,
                             params_on_stage=n_params, detail={**{f"layer.{k}": v for k, v in layer.items()},
                                                               **{f"head.{k}": v for k, v in head.items()}})
        if best is None or est.total > best.total:
            best = est
    return best
