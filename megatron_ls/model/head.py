"""The language-model head, shared by both forms of the LM (TransformerLSLM and its pipeline stages): tokens to
scaled, dropped-out embeddings, and hidden states to this rank's vocabulary partition of the logits.

Under tensor parallelism the vocabulary is padded to a multiple of tp and split across ranks; the padding
columns are masked to a large negative number, so TP=2 with padding computes what TP=1 without it does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ls.model.attention.common import neg_value
from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.parallel import mpu
from megatron_ls.parallel.mappings import copy_to_tensor_model_parallel_region
from megatron_ls.parallel.tensor_sequence import residual_dropout, split_along_sequence


class VocabPartition:
    """This rank's share of the (padded) vocabulary."""

    def __init__(self, config: TransformerLSConfig) -> None:
        tp = mpu.get_tensor_model_parallel_world_size()
        self.vocab_size = config.vocab_size
        self.padded_vocab_size = config.padded_vocab_size(tp)
        self.vocab_start = (self.padded_vocab_size // tp) * mpu.get_tensor_model_parallel_rank()


def embed(embedding: nn.Module, dropout: nn.Module, tokens: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """Scaled embeddings, dropped out; under Megatron's sequence parallelism this TP rank's slice of the tokens."""
    return residual_dropout(dropout, split_along_sequence(embedding(tokens) * math.sqrt(hidden_size)))


def logits_local(hidden: torch.Tensor, weight: torch.Tensor, part: VocabPartition) -> torch.Tensor:
    """This rank's vocabulary partition of the logits (B, N, V_pad / tp); padding columns masked."""
    logits = F.linear(copy_to_tensor_model_parallel_region(hidden), weight)
    n_local = logits.shape[-1]
    if part.vocab_start + n_local > part.vocab_size:
        cols = torch.arange(part.vocab_start, part.vocab_start + n_local, device=logits.device)
        logits = logits.masked_fill(cols >= part.vocab_size, neg_value(logits.dtype))
    return logits


def mean_loss(nats: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over tokens of the per-token loss, each scaled by its target's weight when `weights` (vocab,) is
    given (--loss-weight). Divided by the token count, not the weights' sum: every rank's share of a batch then
    adds up to one process's loss, whatever the layout."""
    return nats.mean() if weights is None else (nats * weights[targets]).mean()
