"""pretrain_char_lm.py's start-up memory check: estimate the layout's peak per GPU, refuse one that cannot fit.

The device's memory is the CUDA card's total, or on CPU the available RAM shared by this node's processes;
--device-memory-gib overrides it (and makes the refusal testable anywhere), --skip-memory-check turns the
refusal off (the estimate is still printed). A refusal names the single changes that would make the layout fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from megatron_ls.errors import ConfigError
from megatron_ls.model.config import TransformerLSConfig

from .memory_estimate import DEFAULT_REDUCE_BUCKET, GiB, MemoryEstimate, TrainingLayout, estimate_memory, fmt_bytes

HEADROOM = 0.95  # the CUDA context, allocator fragmentation and NCCL buffers take the rest


def device_memory_bytes(device_type: str, local_rank: int = 0, override_gib: float | None = None) -> int:
    """Memory one rank may use: --device-memory-gib, the CUDA card's total, or available RAM / local processes."""
    if override_gib is not None:
        return int(override_gib * GiB)
    if device_type == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(local_rank).total_memory)
    import psutil

    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return int(psutil.virtual_memory().available // max(local, 1))


def _core(impl: str) -> str:
    if impl != "fused":
        return "blocked"
    from megatron_ls.kernels.availability import window_pos_mode

    try:
        return "fused-table" if window_pos_mode() == "table" else "fused"
    except ValueError as e:
        raise ConfigError(str(e)) from None


def training_layout(args: argparse.Namespace, config: TransformerLSConfig, ds_config: dict[str, Any],
                    device_type: str) -> TrainingLayout:
    """The estimate's view of this run: batch, parallel sizes, ZeRO settings, precision, attention kernel."""
    zero = ds_config.get("zero_optimization") or {}
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    from megatron_ls.model.attention import resolve_impl

    impl = resolve_impl(config.attention_impl, device_type)
    return TrainingLayout(micro_batch_size=args.micro_batch_size, grad_accum_steps=args.gradient_accumulation_steps,
                          parallel=dataclasses.replace(args.layout, zero_stage=int(zero.get("stage", args.zero_stage))),
                          checkpoint_activations=bool(args.checkpoint_activations),
                          recompute_attention=bool(getattr(args, "recompute_attention", False)), precision=precision,
                          attention_impl=_core(impl), device=device_type,
                          reduce_bucket_size=int(zero.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET)),
                          overlap_comm=bool(zero.get("overlap_comm", False)))


def _alternatives(layout: TrainingLayout, config: TransformerLSConfig, world: int) -> list[tuple[str, TrainingLayout]]:
    """Single changes of the layout a user can make with one flag, most effective kinds first."""
    out: list[tuple[str, TrainingLayout]] = []
    change = lambda **kw: dataclasses.replace(layout, **kw)  # noqa: E731
    reshape = lambda **kw: change(parallel=dataclasses.replace(layout.parallel, **kw))  # noqa: E731
    if not layout.checkpoint_activations:
        if not layout.recompute_attention and layout.attention_impl == "blocked":
            out.append(("add --recompute-granularity selective", change(recompute_attention=True)))
        out.append(("add --checkpoint-activations", change(checkpoint_activations=True, recompute_attention=False)))
    for stage in range(layout.zero_stage + 1, 2 if layout.pp > 1 else 4):
        out.append((f"raise --zero-stage to {stage}", reshape(zero_stage=stage)))
    if layout.micro_batch_size > 1:
        lanes = layout.micro_batch_size * layout.grad_accum_steps
        out.append(("lower --micro-batch-size to 1", change(micro_batch_size=1, grad_accum_steps=lanes)))
    for pp in range(layout.pp + 1, config.num_layers + 1):
        if world % (layout.tp * pp) == 0 and layout.zero_stage <= 1:  # DeepSpeed's pipeline: ZeRO 0/1 only
            out.append((f"raise --pipeline-model-parallel-size to {pp}", reshape(pp=pp)))
            break
    for tp in range(layout.tp + 1, config.num_attention_heads + 1):
        if config.num_attention_heads % tp == 0 and config.ffn_hidden_size % tp == 0 and world % (tp * layout.pp) == 0:
            out.append((f"raise --tensor-model-parallel-size to {tp}", reshape(tp=tp)))
            break
    if layout.precision == "fp32":
        out.append(("add --bf16", change(precision="bf16")))
    return out


def check_memory(args: argparse.Namespace, config: TransformerLSConfig, ds_config: dict[str, Any],
                 device_type: str, local_rank: int = 0) -> tuple[MemoryEstimate, int]:
    """(estimate, device bytes); raises ConfigError with suggestions when the layout cannot fit."""
    layout = training_layout(args, config, ds_config, device_type)
    est = estimate_memory(config, args.seq_length, config.mem_length, layout)
    device = device_memory_bytes(device_type, local_rank, args.device_memory_gib)
    budget = int(device * HEADROOM)
    if est.total <= budget or args.skip_memory_check:
        return est, device
    fits = []
    for text, alt in _alternatives(layout, config, args.world_size):
        alt_total = estimate_memory(config, args.seq_length, config.mem_length, alt).total
        if alt_total <= budget:
            fits.append(f"{text} ({fmt_bytes(alt_total)})")
    where = "per GPU" if device_type == "cuda" else "per process"
    hint = ("; ".join(fits) if fits else
            "no single change fits: combine them, lower --seq-length / --mem-length, or use more or larger devices")
    raise ConfigError(
        f"this layout ({layout.describe()}) needs about {fmt_bytes(est.total)} {where} "
        f"(activations {fmt_bytes(est.activations)}, params+grads+optimizer "
        f"{fmt_bytes(est.params + est.grads + est.optimizer)}) but {fmt_bytes(device)} is available "
        f"({HEADROOM:.0%} usable). Try: {hint}. (--skip-memory-check runs it anyway; --device-memory-gib sets "
        "the device's size)")
