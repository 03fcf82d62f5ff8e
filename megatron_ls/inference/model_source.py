"""Open a model from a consolidated folder or, converted in memory, from a training checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from megatron_ls.checkpoint.consolidated import build_model, is_consolidated, load_consolidated
from megatron_ls.checkpoint.reader import TrainingCheckpoint
from megatron_ls.errors import InferenceError
from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.model.lm import TransformerLSLM


def training_tokenizer(ckpt: TrainingCheckpoint):
    """The tokenizer named in a training checkpoint's run_state.json (sentencepiece paths resolve from the data)."""
    from megatron_ls.data.tokenizers import build_tokenizer
    from megatron_ls.errors import DataError

    if not ckpt.tokenizer:
        return None
    try:
        return build_tokenizer(ckpt.tokenizer, base_dir=ckpt.tokenizer_base_dir)
    except DataError as e:
        raise InferenceError(f"cannot build the tokenizer recorded in {ckpt.path}: {e}") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device named by ``device`` (e.g. cpu, cuda, cuda:1), checked usable here; else one InferenceError."""
    try:
        dev = torch.device(device)
        if dev.type == "meta":
            raise ValueError("meta tensors hold no values")
        torch.empty(0, device=dev)  # CUDA absent or not compiled in, an ordinal past the last device, ...
    except (RuntimeError, AssertionError, ValueError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise InferenceError(f"device {str(device)!r} cannot be used: {reason}") from None
    return dev


@dataclass
class OpenedModel:
    model: TransformerLSLM  # in eval mode, TP=1
    tokenizer: Any  # or None
    provenance: dict[str, Any]  # which checkpoint: folder, iteration, manifest CRC-32 (see read_training.py)


def load_model(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               **config_overrides: Any) -> tuple[TransformerLSLM, Any]:
    """(model in eval mode at TP=1, tokenizer or None)."""
    opened = open_model(path, device, dtype, **config_overrides)
    return opened.model, opened.tokenizer


def open_model(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               **config_overrides: Any) -> OpenedModel:
    """The model, its tokenizer and which checkpoint they were read from."""
    from megatron_ls.checkpoint.consolidated import read_provenance

    device = resolve_device(device)
    if is_consolidated(path):
        model, tokenizer = load_consolidated(path, device, dtype, **config_overrides)
        check_tokenizer_fits(tokenizer, model.config, path)
        return OpenedModel(model, tokenizer, read_provenance(path))
    from megatron_ls.checkpoint.reader import is_training_checkpoint, read_training_checkpoint

    if not os.path.isdir(path):
        raise InferenceError(f"model folder {path} not found")
    if not is_training_checkpoint(path):
        raise InferenceError(f"{path} is neither a consolidated checkpoint (config.json + model.safetensors) nor a "
                             "training checkpoint (no 'latest' file)")
    ckpt, state = read_training_checkpoint(path)
    config = ckpt.config
    if config_overrides:
        config = TransformerLSConfig.from_dict({**config.to_dict(), **config_overrides})
    tokenizer = training_tokenizer(ckpt)
    check_tokenizer_fits(tokenizer, config, ckpt.path)
    model = build_model(state, config, device, dtype, where=f"the weights of {ckpt.path}")
    return OpenedModel(model, tokenizer, ckpt.provenance)


def describe_provenance(provenance: dict[str, Any]) -> str:
    """One phrase: 'runs/x/iter_0000040 (iteration 40, manifest CRC 1a2b3c4d)'."""
    src = provenance.get("converted_from") or provenance
    where = src.get("checkpoint") or provenance.get("model", "?")
    text = f"{where} (iteration {src.get('iteration', '?')}, manifest CRC {src.get('manifest_crc32') or '?'})" \
        if src.get("checkpoint") else str(where)
    if provenance.get("converted_from"):
        text = f"{provenance.get('model')}, converted from {text}"
    return text


def check_tokenizer_fits(tokenizer, config: TransformerLSConfig, where: str) -> None:
    """One InferenceError when the tokenizer's ids are not the model's vocabulary (a tokenizer.json copied
    from another model): found at load time, not when a sampled id fails to decode."""
    if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
        kind = tokenizer.describe().get("type", "?")
        raise InferenceError(f"the tokenizer of {where} ({kind}, {tokenizer.vocab_size} ids) does not fit its "
                             f"model's vocabulary of {config.vocab_size}: the tokenizer belongs to another model")


def reconfigure(model: TransformerLSLM, **overrides: Any) -> None:
    """Change run-time fields (mem_length, seq_length, attention_impl) of a built model, validated.

    Every module holds the one config object, so it is updated in place; weights are untouched.
    """
    try:
        new = TransformerLSConfig.from_dict({**model.config.to_dict(), **overrides})
    except ValueError as e:
        raise InferenceError(f"invalid model setting: {e}") from None
    for key in overrides:
        setattr(model.config, key, getattr(new, key))
