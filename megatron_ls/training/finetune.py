"""--finetune: start a new phase from another checkpoint's weights, in any layout.

The weights are read as one-process (TP=1) fp32 tensors, from a training checkpoint of any TP x PP x ZeRO
layout (ZeRO-3 partitions merged by DeepSpeed's zero_to_fp32) or from a consolidated folder
(config.json + model.safetensors), and copied into this rank's part of the model before
deepspeed.initialize. So every ZeRO stage, 3 included, and every TP / PP layout can start from any
checkpoint: DeepSpeed's own module-only load needs the saved layout and cannot fill ZeRO-3 partitions.
The optimizer, the schedule, the data position and the memory start fresh.

A DeepSpeed checkpoint without our run_state.json (written by another tool) has no model description to
read it by: DeepSpeed loads its module weights itself after initialize (same layout, ZeRO 0-2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_ls.data.tokenizers import tokenizer_mismatch
from megatron_ls.errors import CheckpointError
from megatron_ls.model.config import TransformerLSConfig

from . import checkpointing as ckpt


@dataclass
class FinetuneSource:
    path: str  # the folder the weights come from (a tag folder, or a consolidated folder)
    weights: dict[str, torch.Tensor] | None  # TP=1 fp32 TransformerLSLM weights; None: DeepSpeed loads them
    info: dict[str, Any] = field(default_factory=dict)  # its run_state.json ({} for another tool's checkpoint)


def read_source(load: str, config: TransformerLSConfig, run: dict[str, Any],
                tokenizer: dict[str, Any] | None = None) -> FinetuneSource:
    """Collective. Locate, verify and read --load for --finetune; architecture checked against this run's, and
    its tokenizer against `tokenizer` (this run's shards'): same ids must mean the same symbols."""
    from megatron_ls.checkpoint.consolidated import is_consolidated

    if is_consolidated(load):
        path, info = load, {}
    else:
        path, info = ckpt.locate_checkpoint(load, weights_only=True)  # sizes and CRCs checked by all ranks
        if not info:  # another tool's DeepSpeed checkpoint: no model description to read it by
            return FinetuneSource(path, None)

    def read() -> FinetuneSource:
        from megatron_ls.checkpoint.source import read_weights

        try:
            weights = read_weights(path)
        except CheckpointError as e:
            raise CheckpointError(f"--finetune --load {load}: {e}") from None
        source = FinetuneSource(path, weights.state, weights.info)
        ckpt.check_compatible(source.info, config.to_dict(), run, True, path)
        differ = tokenizer_mismatch(source.info.get("tokenizer"), tokenizer)
        if differ:
            raise CheckpointError(f"--finetune --load {load}: its tokenizer is not this data's ({differ}); the "
                                  "weights would read other symbols")
        return source

    return ckpt.agree_on_checkpoint(read, "reading the --finetune weights")


def copy_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], config: TransformerLSConfig, tp: int,
                 tp_rank: int, pipelined: bool) -> None:
    """Copy this TP rank's slice of TP=1 weights into `model` (TransformerLSLM, or this stage's TransformerLSPipe)."""
    from megatron_ls.checkpoint.tp_shards import tp_shard

    shard = tp_shard(weights, config, tp, tp_rank)
    if pipelined:
        from megatron_ls.checkpoint.param_names import pipe_to_lm_name
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = pipe_to_lm_name(name, config.num_layers, config.tie_embeddings) if pipelined else name
            if key not in shard or shard[key].shape != param.shape:
                have = tuple(shard[key].shape) if key in shard else "nothing"
                raise CheckpointError(f"--finetune: parameter {key} of shape {tuple(param.shape)} on TP rank "
                                      f"{tp_rank}, the checkpoint has {have}")
            param.copy_(shard[key])
