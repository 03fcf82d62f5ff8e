"""TransformerLSLM: the character / byte language model with a per-layer memory.

tokens -> embedding * sqrt(D) -> dropout -> layers (each with its memory) -> final LayerNorm
-> logits through the (tied) embedding (model/head.py). Under tensor parallelism the loss never needs the
full logits (vocab-parallel cross entropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.model.head import VocabPartition, embed, logits_local
from megatron_ls.model.init import unpadded_init
from megatron_ls.model.layer import TransformerLSLayer
from megatron_ls.model.memory import update_memory
from megatron_ls.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_ls.parallel.layers import (
    ColumnParallelLinear,
    SequenceParallelLayerNorm,
    VocabParallelEmbedding,
    normal_init,
)
from megatron_ls.parallel.mappings import (
    gather_from_tensor_model_parallel_region,
)
from megatron_ls.parallel.recompute import checkpoint
from megatron_ls.parallel.sequence import sp_size
from megatron_ls.parallel.tensor_sequence import gather_along_sequence, gather_without_grad

Memory = list[torch.Tensor]


def pad_to_chunks(tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    """``tokens`` (..., n) with zeros appended to a whole number of chunks (the model takes whole chunks).

    The model is causal: its outputs at the first n positions are those without the padding; drop the rest.
    """
    pad = -tokens.shape[-1] % chunk
    return F.pad(tokens, (0, pad)) if pad else tokens


class TransformerLSLM(nn.Module):
    def __init__(self, config: TransformerLSConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab = VocabPartition(config)
        init = unpadded_init(normal_init(config.init_method_std), config.vocab_size)
        self.embedding = VocabParallelEmbedding(self.vocab.padded_vocab_size, config.hidden_size, init_method=init)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(TransformerLSLayer(config) for _ in range(config.num_layers))
        self.final_norm = SequenceParallelLayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.output = None
        if not config.tie_embeddings:
            self.output = ColumnParallelLinear(config.hidden_size, self.vocab.padded_vocab_size, bias=False,
                                               init_method=init)
        # Set by the training engine: recompute each layer in the backward (deepspeed.checkpointing).
        self.checkpoint_activations = False

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab.padded_vocab_size

    # ---- pieces (also used by inference) ----------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return embed(self.embedding, self.embedding_dropout, tokens, self.config.hidden_size)

    def logits_local(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary partition of the logits (B, N, V_pad / tp); padding columns masked."""
        weight = self.embedding.weight if self.output is None else self.output.weight
        return logits_local(hidden, weight, self.vocab)

    def hidden_states(self, tokens: torch.Tensor, memory: Memory | None = None) -> tuple[torch.Tensor, Memory]:
        """Final-normalised hidden states (B, N, D) and the next memory."""
        cfg = self.config
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, N), got {tuple(tokens.shape)}")
        if memory is not None and len(memory) not in (0, cfg.num_layers):
            raise ValueError(f"memory must hold one tensor per layer ({cfg.num_layers}), got {len(memory)}")
        memory = memory or [None] * cfg.num_layers
        cfg.check_segment(tokens.shape[1], 0 if memory[0] is None else memory[0].shape[1])
        h = self.embed(tokens)
        new_memory = []
        for layer, mem in zip(self.layers, memory):
            new_memory.append(update_memory(mem, gather_without_grad(h), cfg.mem_length // sp_size()))
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, mem)
            else:
                h = layer(h, mem)
        return gather_along_sequence(self.final_norm(h)), new_memory

    # ---- the usual entry point --------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, memory: Memory | None = None,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, Memory]:
        """(logits (B, N, vocab_size), new_memory); with `labels` (B, N): (per-token loss in nats, new_memory).

        memory: one detached (B, m, D) tensor per layer (m <= mem_length, a multiple of the chunk),
        or None / [] at the start of a stream.
        """
        hidden, new_memory = self.hidden_states(tokens, memory)
        logits = self.logits_local(hidden)
        if labels is not None:
            return vocab_parallel_cross_entropy(logits, labels), new_memory
        logits = gather_from_tensor_model_parallel_region(logits)
        return logits[..., : self.config.vocab_size], new_memory

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters held by this rank (all of them with TP=1); tied weights counted once."""
        params = {id(p): p for p in self.parameters()}
        n = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            n -= self.embedding.weight.numel()
        return n
