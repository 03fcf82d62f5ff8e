"""Attention benchmark: forward+backward time and memory of one attention layer per implementation.

    python bench/attention.py                         # CPU: N = 1K..8K, B = 1, memory M = N
    python bench/attention.py --sizes 1024,2048 --impls blocked,window
    python bench/attention.py --layer-only            # just the whole-layer CPU budget check
    python bench/attention.py --device cuda --dtype bf16 --tokens 32768 --sizes 2048,8192,32768

Implementations: reference / blocked / fused (long-short), full (causal over memory + segment, SDPA: flash on
GPU), window (causal sliding window of w over memory + segment through FlexAttention, compiled on CUDA: the
anchors' "sliding window only" row; rotary positions like full; FlexAttention has no CPU backward, so it is
skipped there), window-blocked (the model's --attention-type window: the long-short layer without landmarks,
Transformer-XL positions, on the blocked core). Each row is one attention layer (projections, DualLN, landmarks,
positions, core, output projection) with memory M = N (--mem-ratio), width 512, 8 heads, window 512,
chunk 16, one landmark per chunk unless overridden; median of --repeat runs after a warm-up.
Memory: on CUDA the peak allocated during forward+backward; on CPU the bytes the autograd graph
saves for the backward (distinct storages), the activation footprint that grows with N.

Also times one whole Transformer-LS layer (attention + MLP + norms, `blocked`) at N = 4096 with 4096
of memory, batch 1, fp32: the CPU budget of the model issue (<= 2.9 s, the official attention alone).
Writes JSON (bench/results/attention-<device>.json or --output) after every row, and prints a table (median
and minimum of the timed runs: on a shared CPU the minimum is the better estimate of the cost).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.results_json import write_json  # noqa: E402
from megatron_ls.model import TransformerLSConfig  # noqa: E402
from megatron_ls.model.attention import fused_available  # noqa: E402
from megatron_ls.model.attention.sliding_window import sliding_window_attention  # noqa: E402
from megatron_ls.model.layer import TransformerLSLayer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYER_BUDGET_S = 2.9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class SavedBytes:
    """Sum of distinct storages the autograd graph keeps for the backward (CPU memory proxy)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def config_for(args, attention_type: str, impl: str, n: int, m: int) -> TransformerLSConfig:
    return TransformerLSConfig(
        num_layers=12, hidden_size=args.hidden, num_attention_heads=args.heads, ffn_hidden_size=4 * args.hidden,
        window_size=args.window, chunk_size=args.chunk, chunk_rank=args.rank, mem_length=m, dropout=0.0,
        attention_type=attention_type, attention_impl=impl)


def measure(module, x, mem, device, repeat: int, autocast_dtype) -> dict:
    def step() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = module(x, mem)
        out.float().sum().backward()

    step()  # warm-up (and lazy initialisation of kernels)
    times = []
    for _ in range(repeat):
        x.grad = None
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        mem_bytes, mem_kind = torch.cuda.max_memory_allocated() - base, "peak allocated"
    else:
        with SavedBytes() as saved:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = module(x, mem)
        out.float().sum().backward()
        mem_bytes, mem_kind = saved.bytes, "saved for backward"
    return dict(ms=1e3 * statistics.median(times), min_ms=1e3 * min(times), all_ms=[1e3 * t for t in times],
                mem_mib=mem_bytes / 2**20,
                mem_kind=mem_kind)


# impl -> (the layer's attention_type, its long-short core); `window` is the `full` layer with FlexAttention's core.
LAYERS = {"reference": ("long-short", "reference"), "blocked": ("long-short", "blocked"),
          "fused": ("long-short", "fused"), "full": ("full", "blocked"), "window": ("full", "blocked"),
          "window-blocked": ("window", "blocked")}


def attention_rows(args, device, dtype, autocast_dtype, rows: list[dict], save) -> list[dict]:
    """Measures every (N, impl) and appends to `rows`, calling save() after each row."""
    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(LAYERS))
    if unknown:
        raise SystemExit(f"attention.py: error: unknown --impls {','.join(unknown)} (known: {', '.join(LAYERS)})")
    for n in [int(s) for s in args.sizes.split(",")]:
        m = int(n * args.mem_ratio) // args.chunk * args.chunk
        b = max(1, args.tokens // n) if args.tokens else args.batch
        for impl in impls:
            row = dict(impl=impl, N=n, M=m, B=b)
            skip = _skip_reason(impl, n, device, args)
            if skip:
                rows.append({**row, "skipped": skip})
                print(_row_line(rows[-1]), flush=True)
                save()
                continue
            attention_type, core = LAYERS[impl]
            torch.manual_seed(0)
            layer = TransformerLSLayer(config_for(args, attention_type, core, n, m)).to(device, dtype)
            attn = layer.attention
            if impl == "window":
                attn.core = functools.partial(sliding_window_attention, window=args.window)
            x = torch.randn(b, n, args.hidden, device=device, dtype=dtype, requires_grad=True)
            mem = torch.randn(b, m, args.hidden, device=device, dtype=dtype) if m else None
            try:
                rows.append({**row, **measure(attn, x, mem, device, args.repeat, autocast_dtype)})
            except (RuntimeError, NotImplementedError) as e:  # OOM and missing kernels: report, go on
                rows.append({**row, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            del layer, attn, x, mem
            print(_row_line(rows[-1]), flush=True)
            save()
    return rows


def _skip_reason(impl: str, n: int, device: torch.device, args) -> str:
    if impl == "reference" and n > args.max_reference_n:
        return f"reference is O(N^2); N > --max-reference-n {args.max_reference_n}"
    if impl == "fused" and not fused_available(device):
        return "fused kernel cannot run here (CUDA + Triton, or TRITON_INTERPRET=1)"
    if impl == "window" and device.type != "cuda":
        return "FlexAttention has no backward on the CPU"
    return ""


def layer_row(args, device, dtype, autocast_dtype) -> dict:
    n = m = 4096
    torch.manual_seed(0)
    layer = TransformerLSLayer(config_for(args, "long-short", "blocked", n, m)).to(device, dtype)
    x = torch.randn(1, n, args.hidden, device=device, dtype=dtype, requires_grad=True)
    mem = torch.randn(1, m, args.hidden, device=device, dtype=dtype)
    r = measure(layer, x, mem, device, args.repeat, autocast_dtype)
    return dict(what="whole layer (attention + MLP + norms), blocked", N=n, M=m, B=1, **r,
                budget_s=LAYER_BUDGET_S, within_budget=r["ms"] / 1e3 <= LAYER_BUDGET_S)


def _row_line(r: dict) -> str:
    head = f"{r['impl']:>14} {r['N']:>7} {r['M']:>7} {r['B']:>3}"
    if "skipped" in r:
        return f"{head}  skipped: {r['skipped']}"
    return (f"{head} {r['ms']:>11.1f} {r['min_ms']:>9.1f} {r['ms'] / r['N'] / r['B'] * 1e3:>12.2f} "
            f"{r['mem_mib']:>10.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--sizes", default="1024,2048,4096,8192", help="comma-separated segment lengths N")
    p.add_argument("--impls", default="reference,blocked,fused,full,window,window-blocked",
                   help=f"comma-separated, of: {', '.join(LAYERS)}")
    p.add_argument("--mem-ratio", type=float, default=1.0, help="memory M = ratio * N")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=0, help="tokens per step; B = tokens / N (overrides --batch)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-reference-n", type=int, default=2048)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--layer-only", action="store_true", help="only the whole-layer N=4096 measurement")
    p.add_argument("--no-layer", action="store_true", help="skip the whole-layer measurement")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    # Half types run as fp32 weights under autocast (the usual mixed-precision training setting).
    dtype = torch.float32
    autocast_dtype = None if args.dtype == "fp32" else DTYPES[args.dtype]
    env = dict(device=str(device), device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                                                 else platform.processor() or platform.machine()),
               threads=torch.get_num_threads(), torch=torch.__version__, dtype=args.dtype,
               date=time.strftime("%Y-%m-%d %H:%M:%S"), hidden=args.hidden, heads=args.heads, window=args.window,
               chunk=args.chunk, rank=args.rank, mem_ratio=args.mem_ratio, repeat=args.repeat)
    print(f"# {env['device_name']} ({env['device']}, {env['threads']} threads), {args.dtype}, D={args.hidden} "
          f"H={args.heads} w={args.window} c={args.chunk} r={args.rank}, M={args.mem_ratio}*N")

    out = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                      f"attention-{device.type}.json")
    rows: list[dict] = []
    result = dict(env=env, rows=rows, layer=None)
    if not args.layer_only:
        print(f"{'impl':>14} {'N':>7} {'M':>7} {'B':>3} {'fwd+bwd ms':>11} {'min ms':>9} {'us / token':>12} "
              f"{'mem MiB':>10}")
        attention_rows(args, device, dtype, autocast_dtype, rows, lambda: write_json(out, result))
        kinds = {r["mem_kind"] for r in rows if "mem_kind" in r}
        if kinds:
            print(f"(mem = {', '.join(sorted(kinds))})")
    layer = None
    if not args.no_layer:
        layer = layer_row(args, device, dtype, autocast_dtype)
        verdict = "within" if layer["within_budget"] else "OVER"
        print(f"\nwhole layer, blocked, N=4096 M=4096 B=1 {args.dtype}: {layer['ms'] / 1e3:.2f} s fwd+bwd median "
              f"(runs {', '.join(f'{t / 1e3:.2f}' for t in layer['all_ms'])}); budget {LAYER_BUDGET_S} s: {verdict}")

    result["layer"] = layer
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
