"""Models of equal size across attention types: the FFN width that makes up for the attention's own parameters.

Long-short has a dynamic projection, R_c and a second LayerNorm per layer that window-only lacks, and full
attention (rotary positions) has neither R_w nor the u, v biases. To compare them at equal parameters, the
smaller ones get a slightly wider FFN (each FFN unit is 2 D + 1 parameters per layer).
"""

from __future__ import annotations

import dataclasses

from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.training.memory_estimate import layer_parameters


def equal_size_ffn(config: TransformerLSConfig, reference_type: str = "long-short") -> int:
    """FFN width for ``config.attention_type`` whose parameter count is nearest to that of ``config`` with
    attention ``reference_type`` (and its own FFN width)."""
    reference = layer_parameters(dataclasses.replace(config, attention_type=reference_type))
    own = layer_parameters(config)
    per_unit = 2 * config.hidden_size + 1
    return max(1, config.ffn_hidden_size + round((reference - own) / per_unit))
