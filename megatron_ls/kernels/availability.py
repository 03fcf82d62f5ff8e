"""Whether the Triton kernels can run here; imports nothing heavy (Triton is optional)."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch


def interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run in NumPy on the CPU (read when a kernel is decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_available(device: torch.device | str | None = None) -> bool:
    """True when the Triton kernels can run on `device` (default: CUDA if present, else the CPU).

    CUDA needs Triton and a CUDA device; the CPU runs them only under TRITON_INTERPRET=1."""
    if not triton_importable():
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.cuda.is_available()
    return dev.type == "cpu" and interpreting()


# Triton puts tl.dot on tensor cores only from sm_80 on: it dropped Volta's MMA (triton-lang/triton #5066, #5099),
# so on sm_70 (V100) every product of the kernels is a scalar fp32 FMA, and every tile spills. There the blocked
# path on cuBLAS's fp16 tensor cores is faster (docs/V100.md).
FUSED_MIN_CAPABILITY = (8, 0)


def fused_preferred(device: torch.device | str) -> bool:
    """Whether `auto` should run the Triton kernels on `device`: a CUDA device with Triton, compute capability
    >= FUSED_MIN_CAPABILITY. (`fused` by name still runs wherever fused_available says it can.)"""
    dev = torch.device(device)
    if dev.type != "cuda" or not fused_available(dev):
        return False
    return tuple(torch.cuda.get_device_capability(dev)) >= FUSED_MIN_CAPABILITY


WINDOW_POS_MODES = ("band", "table")


def window_pos_mode() -> str:
    """MEGATRON_LS_WINDOW_POS: how the fused kernels get the window position term (read at each call).

    table (default): QR = (q+v) R_w^T by one GEMM before the kernels (an N x w table per head, rebuilt in the
    backward): the position products at the floor, 1.2x the floor in all (bench/kernel_work.py), no spills.
    band: per tile, the queries times the band of R_w rows the tile spans, moved to keys by gather: no table in
    memory, but the band of a 64 x 64 tile is 128 rows (1.35-1.56x the floor) and its backward spills on sm_90."""
    mode = os.environ.get("MEGATRON_LS_WINDOW_POS", "table") or "table"
    if mode not in WINDOW_POS_MODES:
        raise ValueError(f"MEGATRON_LS_WINDOW_POS must be one of {', '.join(WINDOW_POS_MODES)}, got {mode!r}")
    return mode


def autocast_off(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled on t's device; nothing on meta tensors (aot_check and bench/kernel_work.py run the host
    code on them to record the launches), which have no autocast."""
    return contextlib.nullcontext() if t.is_meta else torch.autocast(t.device.type, enabled=False)
