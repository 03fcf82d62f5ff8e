"""Write TP=1 weights as a training checkpoint of another TP x PP layout (weights only).

The files are the ones DeepSpeed itself writes for that layout, so DeepSpeed's
load_checkpoint(load_module_only=True) reads them (ZeRO 0-2, any data-parallel size). `pretrain_char_lm.py
--finetune` does not need this step: it reads the weights of any layout, and of a consolidated folder:
- pp = 1: mp_rank_XX_model_states.pt per TP rank, the weights under "module";
- pp > 1: layer_II-model_XX-model_states.pt per pipeline layer and TP rank, plus one weight-less
  mp_rank_XX_model_states.pt per (stage, TP rank), which DeepSpeed's pipeline engine opens first.
Beside them run_state.json (model config, tokenizer, layout) and manifest.json as
megatron_ls.training.checkpointing writes them, and `latest` last. As in training, the tag is written
as TAG.partial and renamed when complete (replacing an older TAG of that name whole, so no file of a
previous layout survives), and a failure removes the partial folder. SIGINT / SIGTERM wait for that
rename and `latest`; a TAG.old<pid> that a killed run left is removed, or made TAG again when TAG is
missing. There is no optimizer state: a converted checkpoint starts a new phase (--finetune), it cannot
be an exact resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch

from megatron_ls.checkpoint.tp_shards import split_tp
from megatron_ls.errors import CheckpointError
from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.tool_signals import signal_hook, uninterruptible

from .files import PARTIAL, RUN_INFO, publish_tag, tag_name, write_latest
from .manifest import write_manifest
from .param_names import lm_to_pipe_name


def _ds_header(tp: int, pp: int, iteration: int) -> dict[str, Any]:
    try:
        from deepspeed import __version__ as ds_version
    except ImportError:
        ds_version = "0.0.0"
    return {"module": None, "buffer_names": [], "optimizer": None, "param_shapes": None,
            "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None,
            "lr_scheduler": None, "data_sampler": None, "random_ltd": None, "sparse_tensor_module_names": set(),
            "skipped_steps": 0, "global_steps": 0, "global_samples": 0, "dp_world_size": 1,
            "mp_world_size": tp * pp, "ds_version": ds_version, "iteration": iteration,
            "checkpoint_parallel_dimensions": {"tp_degree": tp, "pp_degree": pp}}


def write_training_checkpoint(out_dir: str, state: dict[str, torch.Tensor], config: TransformerLSConfig,
                              tokenizer: dict[str, Any] | None, tp: int, pp: int, iteration: int = 0,
                              source: str | None = None) -> str:
    """Write OUT/iter_XXXXXXX/ and OUT/latest; returns the tag folder."""
    if pp < 1 or pp > config.num_layers:
        raise CheckpointError(f"--target-pp {pp} must be between 1 and num_layers ({config.num_layers})")
    shards = split_tp(state, config, tp)
    tag = tag_name(iteration)
    final = os.path.join(out_dir, tag)
    path = final + PARTIAL
    shutil.rmtree(path, ignore_errors=True)  # left by an interrupted conversion
    os.makedirs(path)
    try:
        _write_tag(path, shards, config, tokenizer, tp, pp, iteration, source)
        write_manifest(path, iteration, tag, tp * pp)
        with uninterruptible():  # TAG -> TAG.old, TAG.partial -> TAG, latest: all of it or none
            _recover_old(final)
            signal_hook("publish")  # test hook: a signal in the publish
            publish_tag(path, final)
            write_latest(out_dir, tag)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return final


def _recover_old(final: str) -> None:
    """TAG.old<pid> folders that an interrupted publish left (a kill between its two renames): removed when
    TAG exists, else one of them is TAG again (the only copy of it), the others are removed after it."""
    folder, tag = os.path.split(final)
    olds = sorted(n for n in os.listdir(folder or ".") if re.fullmatch(re.escape(tag) + r"\.old\d+", n))
    if olds and not os.path.exists(final):
        os.replace(os.path.join(folder, olds.pop()), final)
    for name in olds:
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def _write_tag(path: str, shards: list[dict[str, torch.Tensor]], config: TransformerLSConfig,
               tokenizer: dict[str, Any] | None, tp: int, pp: int, iteration: int, source: str | None) -> None:
    header = _ds_header(tp, pp, iteration)
    if pp == 1:
        for rank, shard in enumerate(shards):
            torch.save(dict(header, module=shard), os.path.join(path, f"mp_rank_{rank:02d}_model_states.pt"))
    else:
        for rank, shard in enumerate(shards):
            layers: dict[int, dict[str, torch.Tensor]] = {}
            for name, tensor in shard.items():
                index, key = lm_to_pipe_name(name, config.num_layers)
                layers.setdefault(index, {})[key] = tensor
            for index, layer_state in layers.items():
                torch.save(layer_state, os.path.join(path, f"layer_{index:02d}-model_{rank:02d}-model_states.pt"))
        for mp_rank in range(tp * pp):
            torch.save(header, os.path.join(path, f"mp_rank_{mp_rank:02d}_model_states.pt"))
    info = {"model": config.to_dict(), "tokenizer": tokenizer, "iteration": iteration, "world_size": tp * pp,
            "layout": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                       "data_parallel_size": 1},
            "converted_from": source, "weights_only": True}
    with open(os.path.join(path, RUN_INFO), "w") as f:
        json.dump(info, f, indent=2)
