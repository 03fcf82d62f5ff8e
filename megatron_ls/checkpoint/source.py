"""Any checkpoint's weights as one process's: a training folder of any TP x PP x ZeRO layout, or a consolidated one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_ls.model.config import TransformerLSConfig


@dataclass
class Weights:
    state: dict[str, torch.Tensor]  # TransformerLSLM names, TP=1, fp32
    config: TransformerLSConfig
    tokenizer: dict[str, Any] | None  # its description
    tokenizer_base_dir: str  # where a relative sentencepiece model path resolves
    iteration: int
    provenance: dict[str, Any]  # which checkpoint: folder, iteration, manifest CRC-32
    info: dict[str, Any] = field(default_factory=dict)  # run_state.json (a consolidated folder: model + tokenizer)


def read_weights(path: str) -> Weights:
    from .consolidated import is_consolidated

    if is_consolidated(path):
        from .consolidated import load_consolidated_state, read_provenance, read_tokenizer_description

        state, config = load_consolidated_state(path)
        tokenizer = read_tokenizer_description(path)
        return Weights({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, config, tokenizer,
                       path, 0, read_provenance(path), {"model": config.to_dict(), "tokenizer": tokenizer})
    from .reader import read_training_checkpoint

    ckpt, state = read_training_checkpoint(path)
    return Weights(state, ckpt.config, ckpt.tokenizer, ckpt.tokenizer_base_dir, int(ckpt.info.get("iteration", 0)),
                   ckpt.provenance, ckpt.info)
