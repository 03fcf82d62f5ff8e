"""--loss-weight CHARS=W: a weight on the training loss of predicting some tokens.

The loss of each target token is multiplied by the weight of that token (1 for every token no flag names) before
the mean over tokens, so the gradient of a few rare, informative predictions is not drowned by the rest: the
answers of a synthetic task (bench/long_range.py weights the values of its key=value records), or digits in a
corpus of arithmetic. The mean stays over the token count, not over the weights, so every parallel layout computes
the same loss as one process. Validation and test losses are never weighted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from megatron_ls.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where the weights are built: the flags are parsed before torch loads
    import torch


def parse_spec(spec: str) -> tuple[str, float]:
    """``"a-z=20"`` -> ("abc...z", 20.0): characters (``x-y`` ranges allowed) and a finite weight >= 0."""
    chars, sep, number = spec.rpartition("=")
    try:
        weight = float(number)
    except ValueError:
        weight = float("nan")
    if not sep or not chars or not (math.isfinite(weight) and weight >= 0):
        raise ConfigError(f"--loss-weight {spec!r}: expected CHARS=W with W a finite number >= 0, e.g. a-z=20")
    return _expand(chars, spec), weight


def _expand(chars: str, spec: str) -> str:
    out, i = [], 0
    while i < len(chars):
        if i + 2 < len(chars) and chars[i + 1] == "-":
            lo, hi = chars[i], chars[i + 2]
            if lo > hi:
                raise ConfigError(f"--loss-weight {spec!r}: the range {lo}-{hi} is empty")
            out.extend(chr(c) for c in range(ord(lo), ord(hi) + 1))
            i += 3
        else:
            out.append(chars[i])
            i += 1
    return "".join(out)


def token_loss_weights(specs: Sequence[str] | None, tokenizer: dict | None, vocab_size: int,
                       base_dir: str | None = None) -> torch.Tensor | None:
    """The (vocab_size,) float32 weight of each target token, or None without --loss-weight (a later flag wins for a
    character two name). Each character must be one token of the shards' tokenizer (`tokenizer`: its description,
    relative model paths from `base_dir`)."""
    if not specs:
        return None
    if tokenizer is None:
        raise ConfigError("--loss-weight names characters, but the shards record no tokenizer to map them to tokens "
                          "(preprocess them again with tools/preprocess_data.py)")
    import torch

    from megatron_ls.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(tokenizer, base_dir)

    weights = torch.ones(vocab_size, dtype=torch.float32)
    for spec in specs:
        chars, weight = parse_spec(spec)
        for ch in chars:
            try:
                ids = [int(i) for i in tokenizer.encode(ch)]
            except Exception as e:  # text8's alphabet refuses other characters  # noqa: BLE001
                raise ConfigError(f"--loss-weight {spec!r}: {ch!r} is not in the data's vocabulary ({e})") from None
            if len(ids) != 1 or not 0 <= ids[0] < vocab_size:
                raise ConfigError(f"--loss-weight {spec!r}: {ch!r} is not one token of the data's tokenizer "
                                  f"(it encodes to {ids})")
            weights[ids[0]] = weight
    return weights
