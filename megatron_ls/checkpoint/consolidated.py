"""The consolidated inference checkpoint: one folder, no DeepSpeed needed to read it.

    DIR/model.safetensors   TransformerLSLM's TP=1 state dict (fp32 unless converted otherwise)
    DIR/config.json         TransformerLSConfig.to_dict()
    DIR/tokenizer.json      the tokenizer description (megatron_ls.data build_tokenizer); a sentencepiece
                            model file is copied beside it and named relative to DIR

Nothing here imports deepspeed (megatron_ls.parallel.random falls back to a local RNG tracker).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any

import torch

from megatron_ls.errors import CheckpointError
from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.model.lm import TransformerLSLM
from megatron_ls.temp_files import sweep, temp_name
from megatron_ls.tool_signals import signal_hook, uninterruptible

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
SOURCE_KEY = "source"  # in config.json: the training checkpoint the weights were converted from
SP_MODEL = "tokenizer.model"  # a sentencepiece model, copied beside tokenizer.json


def is_consolidated(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG)) and os.path.isfile(os.path.join(path, WEIGHTS))


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def save_consolidated(out_dir: str, state_dict: dict[str, torch.Tensor], config: TransformerLSConfig,
                      tokenizer: dict[str, Any] | None, tokenizer_base_dir: str | None = None,
                      source: dict[str, Any] | None = None) -> None:
    """Write DIR; `tokenizer_base_dir` resolves a relative sentencepiece model path of the description;
    `source` (which checkpoint the weights were read from) is recorded in config.json.

    Every input is checked before anything is written; the files are written under temporary names and
    renamed into place at the end (config.json last), so a failure leaves no half-written checkpoint, and
    an overwrite leaves no tokenizer file of the previous model behind. SIGINT / SIGTERM wait for the
    renames: the folder holds the old checkpoint or the new one, never a mix.
    """
    from safetensors.torch import save_file

    check_weights(state_dict, config, where="the weights to save")
    sp_model = None
    if tokenizer is not None:
        tokenizer = dict(tokenizer)
        if tokenizer.get("type") == "sentencepiece":
            sp_model = tokenizer["model"]
            if not os.path.isabs(sp_model) and tokenizer_base_dir is not None:
                sp_model = os.path.join(tokenizer_base_dir, sp_model)
            if not os.path.isfile(sp_model):
                raise CheckpointError(f"the sentencepiece model {sp_model} named by the checkpoint's tokenizer "
                                     "is missing")
            tokenizer["model"] = SP_MODEL
    os.makedirs(out_dir, exist_ok=True)
    sweep(os.path.join(out_dir, name) for name in (SP_MODEL, TOKENIZER, WEIGHTS, CONFIG))  # of killed runs
    suffix = temp_name("")
    files = [(name, os.path.join(out_dir, name)) for name in
             ([SP_MODEL] if sp_model else []) + ([TOKENIZER] if tokenizer is not None else []) + [WEIGHTS, CONFIG]]
    try:
        if sp_model:
            shutil.copyfile(sp_model, os.path.join(out_dir, SP_MODEL) + suffix)
        if tokenizer is not None:
            _write_json(os.path.join(out_dir, TOKENIZER) + suffix, tokenizer)
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()},
                  os.path.join(out_dir, WEIGHTS) + suffix, metadata={"format": "pt", "model": "TransformerLSLM"})
        _write_json(os.path.join(out_dir, CONFIG) + suffix,
                    config.to_dict() | ({SOURCE_KEY: source} if source else {}))
        with uninterruptible():  # no signal leaves a mix of the old and the new files
            for name in (SP_MODEL, TOKENIZER):  # the previous model's tokenizer, if this one has none
                if name not in dict(files):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(out_dir, name))
            for i, (_, final) in enumerate(files):
                os.replace(final + suffix, final)
                if i == 0:
                    signal_hook("publish")  # test hook: a signal between two renames
    finally:  # nothing is left under a temporary name, whatever happened
        for _, final in files:
            with contextlib.suppress(FileNotFoundError):
                os.remove(final + suffix)


def check_weights(state_dict: dict[str, torch.Tensor], config: TransformerLSConfig, where: str) -> None:
    """One clear error when the weights are not those of TransformerLSLM(config) at TP=1."""
    from megatron_ls.checkpoint.tp_shards import expected_shapes

    want = expected_shapes(config)
    missing, unexpected = sorted(set(want) - set(state_dict)), sorted(set(state_dict) - set(want))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        raise CheckpointError(f"{where} do not match the model of the config ({'; '.join(parts)})")
    for name, shape in want.items():
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise CheckpointError(f"{where} do not match the config: {name} has shape {got}, the config "
                                 f"(hidden_size {config.hidden_size}, vocab_size {config.vocab_size}, "
                                 f"num_layers {config.num_layers}, ...) needs {shape}")


def read_config(path: str) -> TransformerLSConfig:
    file = os.path.join(path, CONFIG)
    try:
        with open(file) as f:
            raw = json.load(f)
        if isinstance(raw, dict):
            raw.pop(SOURCE_KEY, None)  # which checkpoint it was converted from: not a model field
        return TransformerLSConfig.from_dict(raw)
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror}") from None
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file} is not a valid model config: {e}") from None


def read_provenance(path: str) -> dict[str, Any]:
    """Which model a consolidated folder is: its path and, when convert_checkpoint wrote it, the training
    checkpoint it came from (folder, iteration, manifest CRC-32)."""
    out: dict[str, Any] = {"model": os.path.abspath(path)}
    try:
        with open(os.path.join(path, CONFIG)) as f:
            source = json.load(f).get(SOURCE_KEY)
    except (OSError, ValueError, AttributeError):
        source = None
    if isinstance(source, dict):
        out["converted_from"] = source
    return out


def read_tokenizer_description(path: str) -> dict[str, Any] | None:
    """The tokenizer description of DIR (tokenizer.json), or None when the folder has none."""
    file = os.path.join(path, TOKENIZER)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            desc = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read the tokenizer description {file}: {e}") from None
    if not isinstance(desc, dict):
        raise CheckpointError(f"{file} is not a tokenizer description (a JSON object)")
    return desc


def read_tokenizer(path: str):
    """The tokenizer of DIR, or None when the folder has no tokenizer.json."""
    from megatron_ls.data.tokenizers import build_tokenizer
    from megatron_ls.errors import DataError

    desc = read_tokenizer_description(path)
    if desc is None:
        return None
    try:
        return build_tokenizer(desc, base_dir=path)
    except (OSError, KeyError, DataError) as e:
        raise CheckpointError(f"cannot build the tokenizer of {os.path.join(path, TOKENIZER)}: {e}") from None


def load_consolidated_state(path: str) -> tuple[dict[str, torch.Tensor], TransformerLSConfig]:
    """(state dict as stored, config) of a consolidated folder, the weights checked against the config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        raise CheckpointError(f"model folder {path} not found")
    if not os.path.isfile(os.path.join(path, WEIGHTS)):
        raise CheckpointError(f"{path} is not a consolidated checkpoint: no {WEIGHTS} (convert a training checkpoint "
                             "with tools/convert_checkpoint.py --load CKPT_DIR --output DIR)")
    config = read_config(path)
    try:
        state = load_file(os.path.join(path, WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {os.path.join(path, WEIGHTS)}: {e}") from None
    check_weights(state, config, f"the weights of {path}")
    return state, config


def load_consolidated(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      **config_overrides: Any) -> tuple[TransformerLSLM, Any]:
    """(model in eval mode, tokenizer or None) from a consolidated folder; overrides e.g. attention_impl."""
    state, config = load_consolidated_state(path)
    if config_overrides:
        config = TransformerLSConfig.from_dict({**config.to_dict(), **config_overrides})
    return build_model(state, config, device, dtype, where=f"the weights of {path}"), read_tokenizer(path)


def build_model(state: dict[str, torch.Tensor], config: TransformerLSConfig, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, where: str = "the weights") -> TransformerLSLM:
    check_weights(state, config, where)
    with torch.device("meta"):
        model = TransformerLSLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device=device, dtype=dtype or torch.float32)
    return model.eval()
