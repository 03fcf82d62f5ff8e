"""Fused GPU implementations behind the reference code's function signatures.

`long_short_attention_fused` runs Triton kernels (forward and backward) for the long-short
attention core; `fused_available()` says whether they can run here, `fused_preferred()` whether `auto`
should pick them (compute capability >= 8.0: docs/V100.md). Triton and the kernels are
imported on first call, so importing this package is cheap, works without Triton, and leaves time
to set TRITON_INTERPRET=1 (read when the kernels are decorated) before.
"""

from __future__ import annotations

import torch

from megatron_ls.kernels.availability import fused_available, fused_preferred
from megatron_ls.kernels.spec import LongShortGeometry


def long_short_attention_fused(
    q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, k_lm: torch.Tensor, v_lm: torch.Tensor,
    pos_bias_u: torch.Tensor, pos_bias_v: torch.Tensor, r_win: torch.Tensor, r_lm: torch.Tensor,
    geo: LongShortGeometry,
) -> torch.Tensor:
    """Triton long-short attention; see megatron_ls.kernels.long_short_fused for the details."""
    from megatron_ls.kernels.long_short_fused import long_short_attention_fused as impl
    return impl(q, k_win, v_win, k_lm, v_lm, pos_bias_u, pos_bias_v, r_win, r_lm, geo)


__all__ = ["LongShortGeometry", "fused_available", "fused_preferred", "long_short_attention_fused"]
