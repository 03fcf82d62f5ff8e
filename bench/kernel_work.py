"""Work account of the fused long-short attention (forward + backward of one layer's core), against the floor.

    python bench/kernel_work.py                          # preset: N = 8K (B 4) and 32K (B 1), M = 0 and M = N
    python bench/kernel_work.py --sizes 8192:4 --mem 1 --modes table

The host code of the fused core runs on meta tensors: its Triton launches are recorded (the real grids,
autotune tiles and arguments) and megatron_ls.kernels.work walks each launch's programs with the kernels' own
loop bounds: tensor-core FLOPs issued (masked and padded work included), global-memory bytes (loads + stores,
L2 hits included) and atomic adds per kernel; torch ops of the core (the window position table's GEMMs,
buffers) are accounted by a dispatch mode (matrix products as FLOPs, bytes read + written).
tests/kernels/test_kernels_fused.py holds the kernel account equal to what the kernels execute under the interpreter.

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
from megatron_ls.kernels.work import TorchOpWork, Work, launch_work, unique_bytes  # noqa: E402

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
    inputs = geo.inputs(dtype)
    grad_out = torch.zeros_like(inputs[0])
    with recorded_launches() as launches, TorchOpWork() as torch_work:
        torch.autograd.grad(long_short_attention_fused(*inputs, geo.spec()), inputs, grad_out)
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


class _Capture:
    """Records the calls of one function or module while the layer runs, to replay each region alone."""

    def __init__(self, owner, name: str) -> None:
        self.owner, self.name, self.calls = owner, name, []
        self.original = getattr(owner, name)

    def __enter__(self) -> _Capture:
        def wrapper(*args, **kwargs):
            self.calls.append((args, kwargs))
            return self.original(*args, **kwargs)

        setattr(self.owner, self.name, wrapper)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.owner, self.name, self.original)


def _replay(fn, args: tuple, kwargs: dict) -> tuple[Work, Work]:
    """(kernel work, torch-op work) of fn(*args, **kwargs) forward + backward alone, inputs as in the layer."""
    def fresh(t):
        return t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t

    args = tuple(fresh(a) for a in args)
    kwargs = {k: fresh(v) for k, v in kwargs.items()}
    leaves = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    with recorded_launches() as launches, TorchOpWork() as torch_work:
        outs = fn(*args, **kwargs)
        outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o.requires_grad]
        torch.autograd.grad(outs, leaves + params, [torch.zeros_like(o) for o in outs], allow_unused=True)
    return _kernels_hbm(launches), torch_work


def _kernels_hbm(launches) -> Work:
    """The launches' tensor-core FLOPs, with their distinct tensors' bytes as the HBM traffic (re-reads hit L2)."""
    kernels = Work()
    for launch in launches:
        kernels.dots.update(launch_work(launch).dots)
        kernels.bytes += unique_bytes(launch)
    return kernels


def layer_account(N: int, B: int, M: int, pos: str) -> dict:
    """Forward + backward of one whole long-short attention layer (fused core, bf16) on meta tensors: its torch
    ops and kernels, by region (DualLN, landmark compression, position tables, the core, the rest: projections,
    concatenations, the output projection and dropout)."""
    from megatron_ls.model import TransformerLSConfig
    from megatron_ls.model import long_short_attention as lsa

    os.environ["MEGATRON_LS_WINDOW_POS"] = pos
    cfg = TransformerLSConfig.from_preset("enwik8-12l", attention_impl="fused", seq_length=N, mem_length=M)
    with torch.device("meta"):
        layer = lsa.LongShortSelfAttention(cfg).to(torch.bfloat16)
    x = torch.zeros(B, N, cfg.hidden_size, dtype=torch.bfloat16, device="meta", requires_grad=True)
    memory = torch.zeros(B, M, cfg.hidden_size, dtype=torch.bfloat16, device="meta") if M else None
    grad_out = torch.zeros_like(x)
    regions = {"DualLN": (layer.ln_win, "forward"), "DualLN ": (layer.ln_lm, "forward"),
               "landmark compression": (lsa, "compress_landmarks_joint"), "position tables": (layer, "_positions"),
               "core": (lsa, "long_short_attention")}
    captures = {name: _Capture(owner, attr) for name, (owner, attr) in regions.items()}
    for c in captures.values():
        c.__enter__()
    try:
        with recorded_launches() as launches, TorchOpWork() as total:
            torch.autograd.grad(layer(x, memory), [x] + list(layer.parameters()), grad_out)
    finally:
        for c in captures.values():
            c.__exit__()
    total_kernels = _kernels_hbm(launches)
    out = {}
    for name, c in captures.items():
        fn = c.original
        key = name.strip()
        k, t = Work(), Work()
        for args, kwargs in c.calls:
            dk, dt = _replay(fn, args, kwargs)
            k += dk
            t += dt
        if key in out:
            k += out[key]["kernels"]
            t += out[key]["torch"]
        out[key] = {"kernels": k, "torch": t}
    rest = Work(bytes=total.bytes - sum(r["torch"].bytes for r in out.values()))
    rest.dots.update(total.dots)
    for r in out.values():
        rest.dots.subtract(r["torch"].dots)
    out["projections and the rest"] = {"kernels": Work(), "torch": rest}
    rows = {name: dict(flops=r["torch"].flops + r["kernels"].flops, bytes=r["torch"].bytes + r["kernels"].bytes,
                       torch_bytes=r["torch"].bytes, kernel_bytes=r["kernels"].bytes) for name, r in out.items()}
    return dict(N=N, B=B, M=M, pos=pos, regions=rows, total_flops=total.flops + total_kernels.flops,
                total_bytes=total.bytes + total_kernels.bytes)


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


def print_layer_table(layers: list[dict]) -> None:
    names = list(layers[0]["regions"])
    print("\nThe whole attention layer (fused core), forward + backward: TFLOP on tensor cores / GB read + written "
          "(kernels: their distinct tensors)")
    print("| N (B) | M | " + " | ".join(names) + " | total |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for row in layers:
        cells = [f"{row['regions'][n]['flops'] / 1e12:.3f} / {row['regions'][n]['bytes'] / 1e9:.2f}" for n in names]
        print(f"| {row['N'] // 1024}K ({row['B']}) | {'N' if row['M'] else 0} | " + " | ".join(cells)
              + f" | {row['total_flops'] / 1e12:.3f} / {row['total_bytes'] / 1e9:.2f} |")


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
    modes = args.modes.split(",")
    rows = [account(CoreGeometry(B, PRESET["H"], N, m * N, PRESET["dh"], PRESET["w"], PRESET["c"], PRESET["r"]),
                    torch.bfloat16, pos)
            for N, B in sizes for m in mems for pos in modes]
    print_table(rows)
    layers = [layer_account(N, B, m * N, modes[0]) for N, B in sizes for m in mems]
    print_layer_table(layers)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(dict(geometry=dict(PRESET, D=512, dtype="bf16", passes="forward+backward"), core=rows,
                       layer=layers), f, indent=1)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
