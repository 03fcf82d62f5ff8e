"""The longest segment (memory = segment, the paper's phases) that fits one GPU, by sequence-parallel degree.

    python bench/longest_sequence.py                       # enwik8-12l and -30l, 8 GPUs of 80 GB, K = 1, 2, 4, 8
    python bench/longest_sequence.py --gpus 8 --device-gib 32 --presets enwik8-30l

From the analytic estimate (megatron_ls/training/memory_estimate.py, sequence parallelism included): for each
preset, SP degree K (the other 8/K ranks data-parallel) and recomputation (none / full), the largest N (a multiple
of K x chunk) whose peak per GPU fits the device. bf16, fused kernels, ZeRO-1, micro-batch 1. Writes JSON
(bench/results/longest_sequence.json or --output) and prints a table. An estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ls.model import TransformerLSConfig  # noqa: E402
from megatron_ls.parallel.layout import ParallelLayout  # noqa: E402
from megatron_ls.training.memory_estimate import GiB, TrainingLayout, estimate_memory  # noqa: E402


def fits(config: TransformerLSConfig, n: int, layout: TrainingLayout, budget: float) -> bool:
    return estimate_memory(config, n, n, layout).total <= budget


def longest(config: TransformerLSConfig, layout: TrainingLayout, budget: float, step: int) -> int:
    """The largest multiple of ``step`` that fits (0 if none): doubling, then bisection."""
    if not fits(config, step, layout, budget):
        return 0
    lo, hi = step, 2 * step
    while fits(config, hi, layout, budget):
        lo, hi = hi, 2 * hi
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(config, mid, layout, budget) else (lo, mid)
    return lo


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="enwik8-12l,enwik8-30l")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--degrees", default="1,2,4,8", help="sequence-parallel degrees K")
    p.add_argument("--device-gib", type=float, default=80.0)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--output")
    a = p.parse_args()
    budget = a.device_gib * GiB
    rows = []
    print(f"{'preset':<12} {'K':>2} {'recompute':<9} {'longest N':>12} {'GiB at N':>9}")
    for preset in a.presets.split(","):
        for k in (int(x) for x in a.degrees.split(",")):
            if a.gpus % k:
                continue
            config = TransformerLSConfig.from_preset(preset, attention_impl="fused")
            if config.num_attention_heads % k:
                continue
            for ckpt in (False, True):
                layout = TrainingLayout(parallel=ParallelLayout(a.gpus, sp=k, zero_stage=a.zero_stage),
                                        precision="bf16", attention_impl="fused", checkpoint_activations=ckpt)
                n = longest(config, layout, budget, k * config.chunk_size)
                used = estimate_memory(config, n, n, layout).total / GiB if n else 0.0
                rows.append({"preset": preset, "sp": k, "checkpoint_activations": ckpt, "longest_n": n,
                             "gib": used, "gpus": a.gpus, "device_gib": a.device_gib, "zero_stage": a.zero_stage})
                print(f"{preset:<12} {k:>2} {'full' if ckpt else 'none':<9} {n:>12,} {used:>9.1f}")
    out = a.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "longest_sequence.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
