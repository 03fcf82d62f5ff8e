"""Merge tensor-parallel shards of TransformerLSLM's state dict into the one-process (TP=1) weights, and back.

Which parameters are split, and along which dimension, is read from the model itself: the TP layers
mark their parameters with `partition_dim` (replicated ones carry none), so this stays right when the
model gains a parameter. The vocabulary is padded to a multiple of tp under TP: merged tables are cut
back to vocab_size, split tables padded with zero rows (padding rows are never read, their logits masked).
"""

from __future__ import annotations

import torch

from megatron_ls.errors import CheckpointError
from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.model.lm import TransformerLSLM

VOCAB_TABLES = ("embedding.weight", "output.weight")


def partition_dims(config: TransformerLSConfig) -> dict[str, int | None]:
    """{TransformerLSLM parameter name: the dim TP splits, or None if replicated}, from a model on 'meta'."""
    with torch.device("meta"):
        model = TransformerLSLM(config)
    return {name: getattr(p, "partition_dim", None) for name, p in model.named_parameters()}


def expected_shapes(config: TransformerLSConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = TransformerLSLM(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def merge_tp(shards: list[dict[str, torch.Tensor]], config: TransformerLSConfig) -> dict[str, torch.Tensor]:
    """TP=1 state dict from the state dicts of TP ranks 0..tp-1 (names as in TransformerLSLM)."""
    dims = partition_dims(config)
    tp = len(shards)
    names = set(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != names:
            raise CheckpointError(f"TP rank {rank} holds parameters {sorted(set(shard) ^ names)} that rank 0 does "
                                 "not (or the reverse): the shards are not of one model")
    unknown = names - set(dims)
    if unknown:
        raise CheckpointError(f"the checkpoint has parameters this model does not: {sorted(unknown)[:5]}")
    missing = set(dims) - names
    if missing:
        raise CheckpointError(f"the checkpoint lacks parameters of this model: {sorted(missing)[:5]}")
    out = {}
    for name in sorted(names):
        dim = dims[name]
        if dim is None or tp == 1:
            out[name] = shards[0][name]
        else:
            out[name] = torch.cat([s[name] for s in shards], dim=dim)
        if name in VOCAB_TABLES:
            out[name] = out[name][: config.vocab_size]
    return out


def split_tp(full: dict[str, torch.Tensor], config: TransformerLSConfig, tp: int) -> list[dict[str, torch.Tensor]]:
    """The state dicts of TP ranks 0..tp-1 from TP=1 weights."""
    return [tp_shard(full, config, tp, rank) for rank in range(tp)]


def tp_shard(full: dict[str, torch.Tensor], config: TransformerLSConfig, tp: int,
             rank: int) -> dict[str, torch.Tensor]:
    """The state dict of TP rank `rank` of `tp` from TP=1 weights (only that rank's pieces are copied)."""
    if config.num_attention_heads % tp or config.ffn_hidden_size % tp:
        raise CheckpointError(f"--target-tp {tp} must divide num_attention_heads ({config.num_attention_heads}) and "
                             f"ffn_hidden_size ({config.ffn_hidden_size})")
    dims = partition_dims(config)
    padded = config.padded_vocab_size(tp)
    shard: dict[str, torch.Tensor] = {}
    for name, tensor in full.items():
        if name in VOCAB_TABLES and padded > tensor.shape[0]:
            tensor = torch.cat([tensor, tensor.new_zeros(padded - tensor.shape[0], *tensor.shape[1:])])
        dim = dims[name]
        piece = tensor if dim is None or tp == 1 else tensor.chunk(tp, dim=dim)[rank]
        shard[name] = piece.clone().contiguous()
    return shard
