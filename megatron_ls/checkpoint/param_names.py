"""Parameter names: TransformerLSLM's (the TP=1 names every reader and writer speaks) against those of its
DeepSpeed PipelineModule form, whose files are per pipeline layer: layer 0 the (tied) embedding, 1..L the
transformer layers, L+1 the final norm, L+2 an untied output."""

from __future__ import annotations

import re

from megatron_ls.errors import CheckpointError

_LAYER_NAME = re.compile(r"^(\d+)\.(.*)$")


def pipe_to_lm_name(name: str, num_layers: int, tie_embeddings: bool = True) -> str:
    """Name of a TransformerLSPipe parameter in TransformerLSLM's state dict."""
    if name.startswith("tied_modules.embed."):
        return name[len("tied_modules.embed."):]
    match = _LAYER_NAME.match(name)
    if match is None:
        raise CheckpointError(f"not a TransformerLSPipe parameter name: {name!r}")
    index, rest = int(match.group(1)), match.group(2)
    if index == 0:
        return rest
    if index <= num_layers:
        return f"layers.{index - 1}.{rest}"
    if index == num_layers + 1:
        return f"final_norm.{rest}"
    if index == num_layers + 2 and not tie_embeddings:
        return rest
    raise CheckpointError(f"not a TransformerLSPipe parameter name: {name!r}")



def lm_to_pipe_name(name: str, num_layers: int) -> tuple[int, str]:
    """(pipeline layer index, key inside that layer) of a TransformerLSLM parameter (inverse of pipe_to_lm_name)."""
    if name.startswith("layers."):
        index, rest = name[len("layers."):].split(".", 1)
        return int(index) + 1, rest
    if name.startswith("final_norm."):
        return num_layers + 1, name[len("final_norm."):]
    if name.startswith("embedding."):
        return 0, name
    if name.startswith("output."):
        return num_layers + 2, name
    raise CheckpointError(f"cannot place parameter {name!r} in a pipeline layer")
