"""The Transformer-LS language model: config, long-short attention, layers, LM with memory."""

from megatron_ls.model.config import PRESETS, TransformerLSConfig
from megatron_ls.model.layer import TransformerLSLayer
from megatron_ls.model.lm import TransformerLSLM

__all__ = ["PRESETS", "TransformerLSConfig", "TransformerLSLayer", "TransformerLSLM"]
