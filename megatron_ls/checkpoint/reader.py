"""Read a megatron-ls training checkpoint (DeepSpeed's files + run_state.json) as TP=1 fp32 weights.

Where the weights are, by layout (megatron_ls.training.checkpointing writes run_state.json with the model
config, the tokenizer description and the TP / PP layout beside DeepSpeed's files):
- pp = 1, ZeRO 0-2: `mp_rank_XX_model_states.pt` per TP rank, key "module" (TransformerLSLM names);
- pp > 1: `layer_II-model_XX-model_states.pt` per pipeline layer and TP rank (DeepSpeed's PipelineModule
  files; layer 0 the tied embedding, 1..L the transformer layers, L+1 the final norm);
- ZeRO 3: the module states hold empty placeholders, and in bf16 / fp16 runs they hold half-precision
  copies: the fp32 weights are the optimizer's partitions, merged with deepspeed.utils.zero_to_fp32 per
  TP rank (that tool globs a whole folder, so each TP rank's files are linked into a folder of their own).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_ls.errors import CheckpointError
from megatron_ls.model.config import TransformerLSConfig

from .files import LATEST, MANIFEST, RUN_INFO, complete_tags, find_tag
from .manifest import manifest_crc32, read_manifest, verify_files
from .param_names import pipe_to_lm_name
from .tp_shards import merge_tp


@dataclass
class TrainingCheckpoint:
    path: str  # the tag folder
    config: TransformerLSConfig
    tokenizer: dict[str, Any] | None
    tp: int
    pp: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer_base_dir(self) -> str:
        """Where a relative sentencepiece model path of the tokenizer resolves: the run's shard folder."""
        data_path = (self.info.get("run") or {}).get("data_path")
        return os.path.dirname(os.path.abspath(data_path)) if data_path else self.path


    @property
    def provenance(self) -> dict[str, Any]:
        """Which checkpoint this is: its folder, iteration and the CRC-32 of its manifest."""
        return {"checkpoint": os.path.abspath(self.path), "iteration": self.info.get("iteration"),
                "manifest_crc32": manifest_crc32(self.path) or None}


def is_training_checkpoint(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, LATEST)) or os.path.isfile(os.path.join(path, RUN_INFO))
            or bool(complete_tags(path)))


def locate(load_dir: str) -> TrainingCheckpoint:
    """Resolve `latest`, read run_state.json, check every file the manifest lists: there, its size, its CRC-32."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"checkpoint folder {load_dir} not found")
    if os.path.isfile(os.path.join(load_dir, RUN_INFO)):
        path = load_dir  # a tag folder given directly
    else:
        latest = os.path.join(load_dir, LATEST)
        if not os.path.isfile(latest) and not complete_tags(load_dir):
            raise CheckpointError(f"{load_dir} holds no training checkpoint: no '{LATEST}' file naming one (and no "
                                 f"{RUN_INFO}); pass the --save folder of a run, or a consolidated folder")
        tag, note = find_tag(load_dir)
        if note:
            print(note, file=sys.stderr)
        path = os.path.join(load_dir, tag)
    try:
        with open(os.path.join(path, RUN_INFO)) as f:
            info = json.load(f)
        config = TransformerLSConfig.from_dict(info["model"])
    except OSError:
        raise CheckpointError(f"{path} is not a megatron-ls checkpoint: no {RUN_INFO}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(path, RUN_INFO)} does not hold a valid model config: {e}") from None
    layout = info.get("layout", {})
    tp, pp = int(layout.get("tensor_model_parallel_size", 1)), int(layout.get("pipeline_model_parallel_size", 1))
    if os.path.isfile(os.path.join(path, MANIFEST)):  # a converted checkpoint has one too; another tool's none
        verify_files(path, read_manifest(path)["files"])  # every size and every CRC-32
    return TrainingCheckpoint(path, config, info.get("tokenizer"), tp, pp, info)


def _load(file: str) -> Any:
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint shard {file} is missing")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged shard
        raise CheckpointError(f"cannot read checkpoint shard {file}: {e}") from None


def _pipeline_shard(ckpt: TrainingCheckpoint, tp_rank: int) -> dict[str, torch.Tensor]:
    cfg = ckpt.config
    # embedding, layers, final norm (+ the untied output); the tied output is layer 0's module, not saved again
    layers = cfg.num_layers + 2 + (0 if cfg.tie_embeddings else 1)
    out = {}
    for idx in range(layers):
        state = _load(os.path.join(ckpt.path, f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt"))
        for key, tensor in state.items():
            out[pipe_to_lm_name(f"{idx}.{key}", cfg.num_layers, cfg.tie_embeddings)] = tensor
    return out


def _zero_fp32(ckpt: TrainingCheckpoint, tp_rank: int) -> dict[str, torch.Tensor]:
    """fp32 weights of one TP rank from the ZeRO optimizer partitions (deepspeed.utils.zero_to_fp32)."""
    try:
        from deepspeed.utils.zero_to_fp32 import _get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor
    except ImportError:
        raise CheckpointError(f"{ckpt.path} keeps its fp32 weights in ZeRO partitions; reading them needs "
                             "DeepSpeed (pip install deepspeed)") from None
    mine = [n for n in os.listdir(ckpt.path)
            if n.endswith(("_model_states.pt", "_optim_states.pt")) and f"mp_rank_{tp_rank:02d}" in n]
    if not any(n.endswith("_optim_states.pt") for n in mine):
        raise CheckpointError(f"checkpoint {ckpt.path} has no ZeRO optimizer shards (*mp_rank_{tp_rank:02d}"
                             f"_optim_states.pt) holding the fp32 weights of TP rank {tp_rank}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in mine:
            os.symlink(os.path.join(os.path.abspath(ckpt.path), n), os.path.join(tmp, n))
        try:
            # zero_to_fp32 prints its progress: keep it off stdout, where generate.py writes its text.
            with contextlib.redirect_stdout(sys.stderr):
                state = _get_fp32_state_dict_from_zero_checkpoint(tmp, exclude_frozen_parameters=False)
        except (ValueError, FileNotFoundError) as e:
            raise CheckpointError(f"cannot merge the ZeRO shards of {ckpt.path} (TP rank {tp_rank}): {e}") from None
        return to_torch_tensor(state)


def _module_shard(ckpt: TrainingCheckpoint, tp_rank: int) -> dict[str, torch.Tensor]:
    plain = os.path.join(ckpt.path, f"mp_rank_{tp_rank:02d}_model_states.pt")
    zero3 = os.path.join(ckpt.path, f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt")
    if not os.path.isfile(plain) and os.path.isfile(zero3):
        return _zero_fp32(ckpt, tp_rank)  # ZeRO 3: the module states are placeholders
    module = _load(plain).get("module")
    if not isinstance(module, dict):
        raise CheckpointError(f"{plain} holds no module weights")
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in module.values()):
        has_optim = any(n.endswith("_optim_states.pt") and f"mp_rank_{tp_rank:02d}" in n
                        for n in os.listdir(ckpt.path))
        if has_optim:
            return _zero_fp32(ckpt, tp_rank)  # half-precision copies; the fp32 masters are the optimizer's
    return module


def read_training_checkpoint(load_dir: str) -> tuple[TrainingCheckpoint, dict[str, torch.Tensor]]:
    """(checkpoint description, TransformerLSLM TP=1 state dict in fp32)."""
    ckpt = locate(load_dir)
    read = _pipeline_shard if ckpt.pp > 1 else _module_shard
    shards = [read(ckpt, r) for r in range(ckpt.tp)]
    full = merge_tp(shards, ckpt.config)
    return ckpt, {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in full.items()}
