"""TransformerLSLM as a DeepSpeed PipelineModule (Megatron-DeepSpeed's GPTModelPipe for Transformer-LS).

Layers: [tied embedding] + num_layers x [TransformerLSLayerPipe] + [final LayerNorm] + [tied output], partitioned
so that each stage holds a balanced share of the transformer layers. Between stages only tensors travel: the
activation tuple is (hidden (B, N, D), micro-batch index (1,) int64). The index says which micro-batch, hence
which fixed set of lanes, the activations belong to, so each stage keeps its own layers' memory per lane set
(memory never crosses a stage boundary) and the pipeline schedule's order does not matter.

Weights are those of TransformerLSLM(config) built from the same RNG state: every rank builds the one-process
model once (its TP shard of it), and each stage copies the parts it owns, so PP=2 starts from PP=1's weights.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.model.head import VocabPartition, embed, logits_local, mean_loss
from megatron_ls.model.layer import TransformerLSLayer
from megatron_ls.model.lm import TransformerLSLM
from megatron_ls.model.memory import LaneMemory, update_memory
from megatron_ls.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_ls.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megatron_ls.parallel.recompute import checkpoint
from megatron_ls.parallel.sequence import sp_size


class EmbeddingPipe(nn.Module):
    """First stage: tokens -> embedded hidden states; also the tied output layer on the last stage."""

    def __init__(self, config: TransformerLSConfig, source: TransformerLSLM | None = None) -> None:
        super().__init__()
        self.config = config
        self.vocab = VocabPartition(config)
        self.embedding = VocabParallelEmbedding(self.vocab.padded_vocab_size, config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.dropout)
        if source is not None:
            self.embedding.load_state_dict(source.embedding.state_dict())

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, lane_set = inputs
        return embed(self.embedding, self.embedding_dropout, tokens, self.config.hidden_size), lane_set


def tied_logits(module: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """The tied output layer: this rank's vocabulary partition of the logits."""
    return logits_local(hidden, module.embedding.weight, module.vocab)


class OutputPipe(nn.Module):
    """Last stage with untied embeddings: its own column-parallel output projection."""

    def __init__(self, config: TransformerLSConfig, source: TransformerLSLM | None = None) -> None:
        super().__init__()
        self.vocab = VocabPartition(config)
        self.output = ColumnParallelLinear(config.hidden_size, self.vocab.padded_vocab_size, bias=False)
        if source is not None:
            self.output.load_state_dict(source.output.state_dict())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return logits_local(hidden, self.output.weight, self.vocab)


class TransformerLSLayerPipe(TransformerLSLayer):
    """One transformer layer that keeps its memory in its stage's LaneMemory, per stream and micro-batch (= fixed
    lane set).

    The memory update (the layer's input, detached) happens outside the checkpointed function, so a
    recompute during the backward neither advances the memory nor reads a different one.
    """

    def __init__(self, config: TransformerLSConfig, index: int, source: TransformerLSLM | None = None,
                 checkpoint_activations: bool = False) -> None:
        super().__init__(config)
        self.mem_length = config.mem_length
        self.index = index
        self.checkpoint_activations = checkpoint_activations
        self.lanes = LaneMemory()  # replaced by the stage's shared one (TransformerLSPipe)
        if source is not None:
            self.load_state_dict(source.layers[index].state_dict())

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, lane_set = inputs
        key = int(lane_set.reshape(-1)[0])
        mem = self.lanes.get(key, self.index)
        if mem is not None and mem.shape[0] != hidden.shape[0]:
            raise ValueError(f"layer {self.index}: memory of micro-batch {key} holds {mem.shape[0]} lanes, "
                             f"the input {hidden.shape[0]}; reset the memory when the batch layout changes")
        self.lanes.put(key, self.index, update_memory(mem, hidden, self.mem_length // sp_size()))
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            out = checkpoint(self._layer, hidden, mem)
        else:
            out = self._layer(hidden, mem)
        return out, lane_set

    def _layer(self, hidden: torch.Tensor, mem: torch.Tensor | None) -> torch.Tensor:
        return TransformerLSLayer.forward(self, hidden, mem)


class FinalNormPipe(nn.LayerNorm):
    """The final LayerNorm; drops the micro-batch index (the output layer needs only the hidden states)."""

    def __init__(self, config: TransformerLSConfig, source: TransformerLSLM | None = None) -> None:
        super().__init__(config.hidden_size, eps=config.layernorm_epsilon)
        if source is not None:
            self.load_state_dict(source.final_norm.state_dict())

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return super().forward(inputs[0])


class PipeLoss:
    """loss_fn of the pipeline: mean nats per token through vocab-parallel cross entropy (in training scaled by
    `weights`, the --loss-weight of each target token, when set).

    While `accumulate` is on (evaluation) it also adds the exact sum of nats and the token count of every
    micro-batch, in float64, on the last stage; only of the first `valid_length` positions when that is set
    (a segment padded to whole chunks).
    """

    def __init__(self) -> None:
        self.accumulate = False
        self.valid_length: int | None = None
        self.sum_nats = 0.0
        self.tokens = 0
        self.weights: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nats = vocab_parallel_cross_entropy(logits, targets)
        if self.accumulate:
            kept = nats.detach() if self.valid_length is None else nats.detach()[..., : self.valid_length]
            self.sum_nats += float(kept.double().sum())
            self.tokens += kept.numel()
            return nats.mean()
        return mean_loss(nats, targets, self.weights)


class TransformerLSPipe(PipelineModule):
    """The pipeline form of TransformerLSLM; memory helpers act on the layers of this stage."""

    def __init__(self, config: TransformerLSConfig, topology: PipeModelDataParallelTopology,
                 checkpoint_activations: bool = False) -> None:
        pipe_loss = PipeLoss()
        # The one-process model, built from the current RNG exactly as with pp=1; stages copy their parts.
        source = TransformerLSLM(config)
        tied = config.tie_embeddings
        specs: list = [TiedLayerSpec("embed", EmbeddingPipe, config, source, tied_weight_attr=["embedding.weight"])
                       if tied else LayerSpec(EmbeddingPipe, config, source)]
        specs += [LayerSpec(TransformerLSLayerPipe, config, i, source, checkpoint_activations)
                  for i in range(config.num_layers)]
        specs.append(LayerSpec(FinalNormPipe, config, source))
        specs.append(TiedLayerSpec("embed", EmbeddingPipe, config, source, forward_fn=tied_logits,
                                   tied_weight_attr=["embedding.weight"])
                     if tied else LayerSpec(OutputPipe, config, source))
        # Stage modules re-initialise before copying from `source`: keep that off the RNG stream.
        with torch.random.fork_rng(devices=[]):
            super().__init__(layers=specs, topology=topology, loss_fn=pipe_loss,
                             partition_method="type:TransformerLSLayerPipe", activation_checkpoint_interval=0)
        self.config = config
        self.pipe_loss = pipe_loss
        self.lanes = LaneMemory()  # this stage's layers' memory
        for layer in self.memory_layers():
            layer.lanes = self.lanes

    def memory_layers(self) -> list[TransformerLSLayerPipe]:
        return [f for f in self.forward_funcs if isinstance(f, TransformerLSLayerPipe)]

    def set_stream(self, stream: str) -> None:
        self.lanes.stream = stream


def build_topology(pp: int, tp: int, dp: int) -> PipeModelDataParallelTopology:
    """Axes (pipe, data, model), the model axis fastest: the rank order of megatron_ls.parallel.mpu."""
    return PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
