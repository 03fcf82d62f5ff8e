"""Pick the implementation of the long-short core by name (`attention_impl`)."""

from __future__ import annotations

import torch

from megatron_ls.kernels.spec import LongShortGeometry
from megatron_ls.model.attention.blocked import long_short_attention_blocked
from megatron_ls.model.attention.reference import long_short_attention_reference


def _fused():
    try:
        from megatron_ls.kernels import long_short_attention_fused
    except ImportError as e:
        raise NotImplementedError(
            "attention_impl='fused' needs megatron_ls.kernels.long_short_attention_fused, which is not "
            f"importable here ({e}); use attention_impl='blocked' or 'auto'") from e
    return long_short_attention_fused


def fused_available(device: torch.device | str | None = None) -> bool:
    """Whether megatron_ls.kernels provides the fused kernel and says it can run on `device`."""
    try:
        import megatron_ls.kernels as kernels

        _fused()
    except (ImportError, NotImplementedError):
        return False
    check = getattr(kernels, "fused_available", None)
    return bool(check(device)) if check is not None else True


def auto_impl(device: torch.device | str) -> str:
    """What `auto` runs on `device`: the fused kernels on a CUDA device where Triton uses tensor cores (compute
    capability >= 8.0: A100, H100), `blocked` elsewhere: on the CPU, and on V100 (sm_70), where Triton's products
    are scalar FMAs and cuBLAS's fp16 tensor cores make the blocked path faster (docs/V100.md)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "blocked"
    try:
        from megatron_ls.kernels import fused_preferred

        _fused()
    except (ImportError, NotImplementedError):
        return "blocked"
    return "fused" if fused_preferred(device) else "blocked"


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """The implementation `impl` names on `device`; 'auto' is decided by auto_impl."""
    if impl == "auto":
        return auto_impl(device)
    if impl not in ("reference", "blocked", "fused"):
        raise ValueError(f"attention_impl must be reference | blocked | fused | auto, got {impl!r}")
    return impl


def long_short_attention(q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, k_lm: torch.Tensor,
                         v_lm: torch.Tensor, pos_bias_u: torch.Tensor, pos_bias_v: torch.Tensor,
                         r_win: torch.Tensor, r_lm: torch.Tensor, *, window: int, chunk: int, chunk_rank: int,
                         mem_len: int, dropout_p: float = 0.0, softmax_scale: float | None = None,
                         impl: str = "auto", recompute: bool = False) -> torch.Tensor:
    """The long-short core on local heads; see megatron_ls.model.attention for the contract.

    `recompute` (selective recomputation) applies to `blocked`: the fused kernel already keeps no scores for the
    backward, and `reference` is the readable definition.
    """
    impl = resolve_impl(impl, q.device)
    if impl == "fused" and dropout_p > 0:
        impl = "blocked"  # the kernels fuse no dropout: the same semantics, dropout on the joint probabilities
    tensors = (q, k_win, v_win, k_lm, v_lm, pos_bias_u, pos_bias_v, r_win, r_lm)
    if impl == "fused":
        return _fused()(*tensors, LongShortGeometry(window, chunk, chunk_rank, mem_len, softmax_scale))
    fn = long_short_attention_reference if impl == "reference" else long_short_attention_blocked
    extra = {"recompute": recompute} if impl == "blocked" else {}
    return fn(*tensors, window=window, chunk=chunk, chunk_rank=chunk_rank, mem_len=mem_len, dropout_p=dropout_p,
              softmax_scale=softmax_scale, **extra)
