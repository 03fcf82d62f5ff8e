"""Training throughput of the presets: tokens/s, ms/step, peak memory and model FLOPs utilisation.

    python bench/train_throughput.py                       # CPU: 2-layer slice of enwik8-12l, N = 2K and 4K, batch 1
    python bench/train_throughput.py --device cuda         # GPU: the whole preset, N = 2K / 8K / 32K, 32K tokens/step
    python bench/train_throughput.py --presets enwik8-12l,enwik8-30l --sizes 8192 --types long-short,full

Each row trains the model (TransformerLSLM, AdamW; fused AdamW on CUDA) for --warmup + --steps steps on random
tokens with the memory carried from step to step (M = N unless --mem-ratio), and reports the median step.
MFU = analytic model FLOPs (megatron_ls.training.flops: useful multiply-adds, backward = 2 x forward, recompute
not counted) per second over the matmul rate of this device measured in the same run (CUDA: bf16 8192^3; CPU:
fp32 2048^3). Peak memory: CUDA max_memory_allocated; CPU the process's peak resident size (ru_maxrss, monotone
over the run). Writes JSON (bench/results/train_throughput-<device>.json or --output) after every row and prints a
table.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.results_json import write_json  # noqa: E402
from megatron_ls.model import TransformerLSConfig  # noqa: E402
from megatron_ls.model.lm import TransformerLSLM  # noqa: E402
from megatron_ls.training.flops import training_flops  # noqa: E402

GiB = 1024 ** 3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device) -> float:
    """FLOP/s of a large square matmul: bf16 8192^3 on CUDA, fp32 2048^3 on CPU (best of a few)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5 if device.type == "cuda" else 3):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kilobytes on Linux


def run_case(config: TransformerLSConfig, batch: int, N: int, steps: int, warmup: int, device: torch.device,
             dtype: str) -> dict:
    torch.manual_seed(0)
    model = TransformerLSLM(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = torch.randint(0, config.vocab_size, (batch, (warmup + steps) * N + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    memory, times = None, []
    for step in range(warmup + steps):
        tokens, labels = data[:, step * N:(step + 1) * N], data[:, step * N + 1:(step + 1) * N + 1]
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss, memory = model(tokens, memory, labels=labels)
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return {"seconds": times, "peak_bytes": peak_bytes(device), "params": model.num_parameters()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--presets", default="enwik8-12l", help="comma-separated presets")
    p.add_argument("--types", default="long-short,full,window", help="attention types to compare")
    p.add_argument("--sizes", help="segment lengths N [CPU 2048,4096; CUDA 2048,8192,32768]")
    p.add_argument("--layers", type=int, help="layers of the preset to train [CPU 2 (a slice); CUDA all]")
    p.add_argument("--batch", type=int, help="sequences per step [CPU 1; CUDA --tokens / N]")
    p.add_argument("--tokens", type=int, default=32768, help="tokens per step on CUDA when --batch is not given")
    p.add_argument("--mem-ratio", type=float, default=1.0, help="memory M = ratio x N (the paper: 1)")
    p.add_argument("--steps", type=int, help="timed steps [CPU 2; CUDA 10]")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (they also fill the memory)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="[CPU fp32; CUDA bf16 autocast]")
    p.add_argument("--output")
    a = p.parse_args()

    device = torch.device(a.device)
    cpu = device.type == "cpu"
    sizes = [int(s) for s in (a.sizes or ("2048,4096" if cpu else "2048,8192,32768")).split(",")]
    steps = a.steps or (2 if cpu else 10)
    dtype = a.dtype or ("fp32" if cpu else "bf16")
    rate = matmul_rate(device)
    name = torch.cuda.get_device_name(device) if not cpu else platform.processor() or platform.machine()
    print(f"{name}: matmul {'bf16 8192^3' if not cpu else 'fp32 2048^3'} = {rate / 1e12:.3f} TFLOP/s; "
          f"{torch.get_num_threads()} threads" if cpu else f"{name}: bf16 matmul {rate / 1e12:.1f} TFLOP/s")
    out = a.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"train_throughput-{device.type}.json")
    rows: list[dict] = []
    result = {"device": name, "matmul_flops_per_s": rate, "threads": torch.get_num_threads(), "rows": rows,
              "steps": steps, "warmup": a.warmup, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    for preset in a.presets.split(","):
        for N in sizes:
            for attention_type in a.types.split(","):
                M = int(round(N * a.mem_ratio))
                layers = a.layers or (2 if cpu else None)
                overrides = {"attention_type": attention_type, "mem_length": M}
                if layers:
                    overrides["num_layers"] = layers
                config = TransformerLSConfig.from_preset(preset, **overrides)
                batch = a.batch or (1 if cpu else max(1, a.tokens // N))
                row = {"preset": preset, "layers": config.num_layers, "attention_type": attention_type, "N": N,
                       "M": M, "batch": batch, "dtype": dtype}
                try:
                    res = run_case(config, batch, N, steps, a.warmup, device, dtype)
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                    rows.append(row)
                    write_json(out, result)
                    print(f"{preset} {attention_type} N={N}: out of memory")
                    torch.cuda.empty_cache()
                    continue
                step_s = statistics.median(res["seconds"])
                flops = training_flops(config, batch, N, M)
                row.update(ms_per_step=step_s * 1e3, min_ms=min(res["seconds"]) * 1e3,
                           tokens_per_s=batch * N / step_s, peak_gib=res["peak_bytes"] / GiB,
                           model_tflops_per_step=flops / 1e12, mfu=flops / step_s / rate, params=res["params"])
                rows.append(row)
                write_json(out, result)
                print(f"  {preset} x{config.num_layers} {attention_type:<10} N={N:<6} B={batch}: "
                      f"{row['ms_per_step']:.0f} ms/step, {row['tokens_per_s']:,.0f} tok/s, MFU {row['mfu']:.1%}")

    head = f"{'preset':<11} {'layers':>6} {'attention':<10} {'N':>6} {'B':>3} {'ms/step':>9} {'min ms':>9} " \
           f"{'tokens/s':>10} {'peak GiB':>9} {'MFU':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<11} {r['layers']:>6} {r['attention_type']:<10} {r['N']:>6} {r['batch']:>3} "
                  f"{r['error']}")
            continue
        print(f"{r['preset']:<11} {r['layers']:>6} {r['attention_type']:<10} {r['N']:>6} {r['batch']:>3} "
              f"{r['ms_per_step']:>9.0f} {r['min_ms']:>9.0f} {r['tokens_per_s']:>10,.0f} {r['peak_gib']:>9.2f} "
              f"{r['mfu']:>7.1%}")
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
