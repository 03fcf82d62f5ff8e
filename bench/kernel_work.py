"""Work account of the fused long-short attention (forward + backward of one layer's core), against the floor.

    python bench/kernel_work.py                          # preset: N = 8K (B 4) and 32K (B 1), M = 0 and M = N
    python bench/kernel_work.py --sizes 8192:4 --mem 1 --modes table

The host code of the fused core runs on meta tensors: its Triton launches are recorded (the real grids,
autotune tiles and arguments) and megatron_ls.kernels.work walks each launch's programs with the kernels' own
loop bounds: tensor-core FLOPs issued (masked and padded work included), global-memory bytes (loads + stores,
L2 hits included) and atomic adds per kernel; torch ops of the core (the window position table's GEMMs,
buffers) are accounted by a dispatch mode (matrix products as FLOPs, bytes read + written).
tests/test_kernels_fused.py holds the kernel account equal to what the kernels execute under the interpreter.

Floor: every visible (query, window key or landmark) pair costs 2 dh FLOPs for each of 10 products (forward
QK, position, PV; backward QK and position recomputed, dP, dQ, dK, dV, dPosition). Needs no GPU.
Writes bench/results/kernel_work.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ls.kernels.launches import CoreGeometry, recorded_launches  # noqa: E402
from megatron_ls.kernels.work import TorchOpWork, launch_work, unique_bytes  # noqa: E402

FLOOR_PRODUCTS = 10
PRESET = dict(H=8, dh=64, w=512, c=16, r=1)


def visible_pairs(geo: CoreGeometry) -> tuple[int, int]:
    """(window pairs, landmark pairs) of all queries, batch and heads included."""
    i = np.arange(geo.N, dtype=np.int64)
    window = np.minimum(geo.w, geo.M + i + 1).sum()
    landmarks = ((geo.M + i) // geo.c * geo.r).sum() if geo.landmarks else 0
    return int(window) * geo.B * geo.H, int(landmarks) * geo.B * geo.H


def core_launches(geo: CoreGeometry, dtype: torch.dtype, pos: str):
    """Recorded kernel launches and the torch ops' Work of one forward + backward of the fused core."""
    from megatron_ls.kernels.long_short_fused import long_short_attention_fused

    os.environ["MEGATRON_LS_WINDOW_POS"] = pos
    inputs = [t.requires_grad_() for t in geo.inputs(dtype)]
    grad_out = torch.zeros_like(inputs[0])
    with recorded_launches() as launches, TorchOpWork() as torch_work:
        torch.autograd.grad(long_short_attention_fused(*inputs, **geo.kwargs()), inputs, grad_out)
    return launches, torch_work


def tile_of(launch, config) -> str:
    meta = launch.meta(config)
    if "BM" not in meta:
        return "-"
    return f"{meta['BM']}x{meta['BN']}/{config.num_warps}w"


def account(geo: CoreGeometry, dtype: torch.dtype, pos: str) -> dict:
    launches, torch_work = core_launches(geo, dtype, pos)
    win, lm = visible_pairs(geo)
    floor = (win + lm) * 2 * geo.dh * FLOOR_PRODUCTS
    kernels, worst, best = [], 0, 0
    for launch in launches:
        works = [launch_work(launch, cfg) for cfg in launch.configs]
        w = works[0]
        flops = [x.flops for x in works]
        worst, best = worst + max(flops), best + min(flops)
        kernels.append(dict(kernel=launch.name, tile=tile_of(launch, launch.configs[0]), flops=w.flops,
                            bytes=w.bytes, unique_bytes=unique_bytes(launch), atomics=w.atomics, flops_all_tiles=flops,
                            tiles=[tile_of(launch, c) for c in launch.configs]))
    issued = sum(k["flops"] for k in kernels) + torch_work.flops
    return dict(N=geo.N, B=geo.B, M=geo.M, pos=pos, window_pairs=win, landmark_pairs=lm, floor_flops=floor,
                kernels=kernels, torch=dict(flops=torch_work.flops, bytes=torch_work.bytes),
                issued_flops=issued, ratio=issued / floor, ratio_worst_tiles=(worst + torch_work.flops) / floor,
                ratio_best_tiles=(best + torch_work.flops) / floor,
                bytes=sum(k["bytes"] for k in kernels) + torch_work.bytes,
                unique_bytes=sum(k["unique_bytes"] for k in kernels) + torch_work.bytes,
                atomics=sum(k["atomics"] for k in kernels))


def print_table(rows: list[dict]) -> None:
    print("| N (B) | M | window pos | kernel (tile) | TFLOP issued | GB loaded+stored | GB distinct | atomics (M) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        head = f"| {row['N'] // 1024}K ({row['B']}) | {'N' if row['M'] else 0} | {row['pos']} "
        for k in row["kernels"]:
            print(f"{head}| {k['kernel'].strip('_')} ({k['tile']}) | {k['flops'] / 1e12:.3f} | "
                  f"{k['bytes'] / 1e9:.2f} | {k['unique_bytes'] / 1e9:.2f} | {k['atomics'] / 1e6:.0f} |")
        tb = row["torch"]["bytes"] / 1e9
        print(f"{head}| torch ops of the core | {row['torch']['flops'] / 1e12:.3f} | {tb:.2f} | {tb:.2f} | 0 |")
        print(f"{head}| **total: {row['ratio']:.2f}x the floor** ({row['ratio_best_tiles']:.2f}-"
              f"{row['ratio_worst_tiles']:.2f}x over the tiles) | {row['issued_flops'] / 1e12:.3f} "
              f"(floor {row['floor_flops'] / 1e12:.3f}) | {row['bytes'] / 1e9:.2f} | {row['unique_bytes'] / 1e9:.2f} | "
              f"{row['atomics'] / 1e6:.0f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8192:4,32768:1", help="N:B pairs (default: the issue's two)")
    ap.add_argument("--mem", default="0,1", help="memory length as multiples of N (0: none, 1: M = N)")
    ap.add_argument("--modes", default="table,band", help="window position modes")
    ap.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "kernel_work.json"))
    args = ap.parse_args(argv)
    try:
        sizes = [tuple(int(x) for x in s.split(":")) for s in args.sizes.split(",")]
        mems = [int(x) for x in args.mem.split(",")]
        assert all(len(s) == 2 for s in sizes)
    except (ValueError, AssertionError):
        print(f"kernel_work: error: --sizes must be N:B pairs and --mem integers, got {args.sizes!r} / {args.mem!r}",
              file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        print("kernel_work: error: unset TRITON_INTERPRET: the account is of the GPU tiles", file=sys.stderr)
        return 2
    rows = [account(CoreGeometry(B, PRESET["H"], N, m * N, PRESET["dh"], PRESET["w"], PRESET["c"], PRESET["r"]),
                    torch.bfloat16, pos)
            for N, B in sizes for m in mems for pos in args.modes.split(",")]
    print_table(rows)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(dict(geometry=dict(PRESET, D=512, dtype="bf16", passes="forward+backward"), rows=rows), f, indent=1)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
