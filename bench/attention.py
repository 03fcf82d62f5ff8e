"""Attention benchmark: forward+backward time and memory of one attention layer per implementation.

    python bench/attention.py                         # CPU: N = 1K..8K, B = 1, memory M = N
    python bench/attention.py --sizes 1024,2048 --impls blocked,window-blocked
    python bench/attention.py --layer-only --official-layer transformer-ls/autoregressive/model_lib/layer.py
    python bench/attention.py --layer-only --no-layer --profile   # where the blocked layer's time goes
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

The implementations of one size are timed alternately (one step of each per round), so that a busy
machine slows them alike.

Also times the whole one-layer LM (embedding, attention + MLP + norms, head and loss; `blocked`) at N = 4096 with
4096 of memory, batch 1, fp32, forward+backward, against the official Transformer-LS attention layer ALONE,
alternately in this process, median of --layer-repeat (5): issue 15 asks for a ratio <= 0.5. On the CPU it also
prints the floor of that ratio on this machine (bench/lm_floor.py: the LM's products at the fp32 matmul rate
measured in the same run, nothing else counted), and times the same LM with a core that costs nothing in the same
rounds (bench/free_core.py): the time outside the core, and so the time the target leaves the core; and our
attention layer alone, the official layer's scope. It counts each case's page faults per step: under glibc's
default malloc the official layer takes ~600k (GB of fresh pages, zeroed by the kernel, per step), the LM ~50k;
--keep-freed-memory measures with glibc keeping what it frees (bench/allocator.py), as a caching allocator would.
The official layer is read from a checkout of NVIDIA/transformer-ls given by --official-layer
PATH/autoregressive/model_lib/layer.py (see BENCHMARKS.md); without the flag that comparison is skipped. --profile
prints where the attention layer's time goes (torch.profiler, N = 4096, M = 4096): issue 15 asks for concatenation
+ copies + fills + elementwise adds <= 20% of its self time.
Writes JSON (bench/results/attention-<device>.json or --output) after every size, and prints a table (median
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

from bench.allocator import keep_freed_memory, minor_faults  # noqa: E402
from bench.free_core import free_core  # noqa: E402
from bench.lm_floor import lm_floor  # noqa: E402
from bench.official_layer import OfficialAttention, OfficialLayerError, load_official_layer  # noqa: E402
from bench.op_profile import op_shares, print_shares  # noqa: E402
from bench.results_json import write_json  # noqa: E402
from megatron_ls.model import TransformerLSConfig  # noqa: E402
from megatron_ls.model.attention import fused_available  # noqa: E402
from megatron_ls.model.attention.sliding_window import sliding_window_attention  # noqa: E402
from megatron_ls.model.layer import TransformerLSLayer  # noqa: E402
from megatron_ls.model.lm import TransformerLSLM  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET_RATIO = 0.5  # issue 15: the whole one-layer LM <= 0.5 x the official attention layer alone


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


class Case:
    """One timed forward+backward: `step()` runs it; `memory()` measures what it keeps for the backward."""

    def __init__(self, module, inputs: tuple, device: torch.device, autocast_dtype, loss=None) -> None:
        self.module, self.inputs, self.device, self.autocast_dtype = module, inputs, device, autocast_dtype
        self.loss = loss or (lambda out: out.float().sum())
        self.times: list[float] = []
        self.faults: list[int] = []  # page faults of each timed step (CPU: fresh pages from the allocator)

    def forward(self):
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.module(*self.inputs)

    def step(self) -> None:
        self.loss(self.forward()).backward()

    def timed_step(self) -> None:
        for t in self.inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None
        sync(self.device)
        f0, t0 = minor_faults(), time.perf_counter()
        self.step()
        sync(self.device)
        self.times.append(time.perf_counter() - t0)
        self.faults.append(minor_faults() - f0)

    def memory(self) -> tuple[float, str]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.step()
            sync(self.device)
            return (torch.cuda.max_memory_allocated() - base) / 2**20, "peak allocated"
        with SavedBytes() as saved:
            out = self.forward()
        self.loss(out).backward()
        return saved.bytes / 2**20, "saved for backward"

    def result(self) -> dict:
        mem_mib, mem_kind = self.memory()
        return dict(ms=1e3 * statistics.median(self.times), min_ms=1e3 * min(self.times),
                    all_ms=[1e3 * t for t in self.times], mem_mib=mem_mib, mem_kind=mem_kind)


class FreeCoreCase(Case):
    """A case whose steps run with a blocked core that costs nothing (bench/free_core.py)."""

    def step(self) -> None:
        with free_core():
            super().step()


def alternate(cases: dict[str, Case], repeat: int) -> dict[str, str]:
    """Warm each case up, then time one step of each per round: a busy machine slows them alike.

    A case that fails (OOM, a missing kernel) is dropped and reported; the others go on."""
    failed: dict[str, str] = {}

    def run(name: str, step) -> None:
        try:
            step()
        except (RuntimeError, NotImplementedError) as e:
            failed[name] = _failure(e)
            del cases[name]

    for name, case in list(cases.items()):
        run(name, case.step)
    for _ in range(repeat):
        for name, case in list(cases.items()):
            run(name, case.timed_step)
    return failed


# impl -> (the layer's attention_type, its long-short core); `window` is the `full` layer with FlexAttention's core.
LAYERS = {"reference": ("long-short", "reference"), "blocked": ("long-short", "blocked"),
          "fused": ("long-short", "fused"), "full": ("full", "blocked"), "window": ("full", "blocked"),
          "window-blocked": ("window", "blocked")}


def attention_rows(args, device, dtype, autocast_dtype, rows: list[dict], save) -> list[dict]:
    """Measures every (N, impl), the impls of one N alternately, appending to `rows`; save() after each N."""
    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(LAYERS))
    if unknown:
        raise SystemExit(f"attention.py: error: unknown --impls {','.join(unknown)} (known: {', '.join(LAYERS)})")
    for n in [int(s) for s in args.sizes.split(",")]:
        m = int(n * args.mem_ratio) // args.chunk * args.chunk
        b = max(1, args.tokens // n) if args.tokens else args.batch
        cases: dict[str, Case] = {}
        skipped = {impl: _skip_reason(impl, n, device, args) for impl in impls}
        for impl in impls:
            if skipped[impl]:
                continue
            attention_type, core = LAYERS[impl]
            torch.manual_seed(0)
            layer = TransformerLSLayer(config_for(args, attention_type, core, n, m)).to(device, dtype)
            if impl == "window":
                layer.attention.core = functools.partial(sliding_window_attention, window=args.window)
            x = torch.randn(b, n, args.hidden, device=device, dtype=dtype, requires_grad=True)
            mem = torch.randn(b, m, args.hidden, device=device, dtype=dtype) if m else None
            cases[impl] = Case(layer.attention, (x, mem), device, autocast_dtype)
        skipped.update(alternate(cases, args.repeat))
        for impl in impls:
            row = dict(impl=impl, N=n, M=m, B=b)
            try:
                row.update({"skipped": skipped[impl]} if skipped[impl] else cases[impl].result())
            except (RuntimeError, NotImplementedError) as e:  # OOM while measuring memory
                row["skipped"] = _failure(e)
            rows.append(row)
            print(_row_line(row), flush=True)
        ms = {r["impl"]: r["ms"] for r in rows if r["N"] == n and "ms" in r}
        if "blocked" in ms and "full" in ms:
            print(f"{'':>14} N={n}: full / blocked = {ms['full'] / ms['blocked']:.2f}x (same run, alternated)")
        del cases
        save()
    return rows


def _failure(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def _skip_reason(impl: str, n: int, device: torch.device, args) -> str:
    if impl == "reference" and n > args.max_reference_n:
        return f"reference is O(N^2); N > --max-reference-n {args.max_reference_n}"
    if impl == "fused" and not fused_available(device):
        return "fused kernel cannot run here (CUDA + Triton, or TRITON_INTERPRET=1)"
    if impl == "window" and device.type != "cuda":
        return "FlexAttention has no backward on the CPU"
    return ""


def one_layer_lm(args, device, dtype, autocast_dtype, n: int, m: int) -> Case:
    """The whole one-layer LM of the enwik8 presets' width (blocked, dropout off), tokens -> mean loss."""
    torch.manual_seed(0)
    cfg = TransformerLSConfig.from_preset("enwik8-12l", num_layers=1, hidden_size=args.hidden,
                                          num_attention_heads=args.heads, ffn_hidden_size=4 * args.hidden,
                                          window_size=args.window, chunk_size=args.chunk, chunk_rank=args.rank,
                                          mem_length=m, dropout=0.0, attention_impl="blocked")
    lm = TransformerLSLM(cfg).to(device, dtype).train()
    tokens = torch.randint(0, cfg.vocab_size, (1, n), device=device)
    memory = [torch.randn(1, m, args.hidden, device=device, dtype=dtype)]
    return Case(lambda t, mem: lm(t, mem, labels=t)[0], (tokens, memory), device, autocast_dtype,
                loss=lambda out: out.float().mean())


def lm_vs_official(args, device, dtype, autocast_dtype) -> dict:
    n = m = 4096
    ours = one_layer_lm(args, device, dtype, autocast_dtype, n, m)
    rest = FreeCoreCase(ours.module, ours.inputs, device, autocast_dtype, ours.loss)
    layer = attention_layer(args, device, dtype, autocast_dtype, n, m)
    cases, official = {"one-layer LM": ours, "one-layer LM, free core": rest, "attention layer": layer}, None
    if args.official_layer:
        module = load_official_layer(args.official_layer)
        torch.manual_seed(0)
        theirs = OfficialAttention(module, args.hidden, args.heads, args.chunk, args.rank, args.window, n, m)
        x = torch.randn(1, n, args.hidden, device=device, dtype=dtype, requires_grad=True)
        mem = torch.randn(1, m, args.hidden, device=device, dtype=dtype)
        official = Case(theirs.to(device, dtype), (x, mem), device, autocast_dtype)
        cases["official layer"] = official
    failed = alternate(cases, args.layer_repeat)
    if failed:
        raise SystemExit("bench/attention.py: " + "; ".join(f"{name}: {why}" for name, why in failed.items()))
    out = dict(what="whole one-layer LM (blocked) vs the official Transformer-LS attention layer alone", N=n, M=m,
               B=1, lm_ms=1e3 * statistics.median(ours.times), lm_all_ms=[1e3 * t for t in ours.times],
               outside_core_ms=1e3 * statistics.median(rest.times),
               layer_ms=1e3 * statistics.median(layer.times),
               faults_per_step=dict(lm=statistics.median(ours.faults), lm_free_core=statistics.median(rest.faults),
                                    layer=statistics.median(layer.faults)))
    if device.type == "cpu" and autocast_dtype is None:
        out["floor"] = lm_floor(ours.step, n=n, m=m, hidden=args.hidden, heads=args.heads, window=args.window,
                                chunk=args.chunk, rank=args.rank)
    if official is None:
        out["official"] = ("skipped: pass --official-layer PATH (NVIDIA/transformer-ls "
                           "autoregressive/model_lib/layer.py)")
        return out
    out["faults_per_step"]["official"] = statistics.median(official.faults)
    out.update(official_ms=1e3 * statistics.median(official.times), official_all_ms=[1e3 * t for t in official.times],
               official_source=os.path.abspath(args.official_layer))
    out["ratio"] = out["lm_ms"] / out["official_ms"]
    out["target_ratio"] = TARGET_RATIO
    out["outside_core_ratio"] = out["outside_core_ms"] / out["official_ms"]
    out["core_budget_ms"] = TARGET_RATIO * out["official_ms"] - out["outside_core_ms"]
    out["layer_ratio"] = out["layer_ms"] / out["official_ms"]
    if "floor" in out:
        out["floor"]["ratio"] = out["floor"]["floor_ms"] / out["official_ms"]
    return out


def attention_layer(args, device, dtype, autocast_dtype, n: int, m: int) -> Case:
    """Our long-short attention layer alone (blocked): the same scope as the official layer."""
    torch.manual_seed(0)
    layer = TransformerLSLayer(config_for(args, "long-short", "blocked", n, m)).to(device, dtype)
    x = torch.randn(1, n, args.hidden, device=device, dtype=dtype, requires_grad=True)
    mem = torch.randn(1, m, args.hidden, device=device, dtype=dtype)
    return Case(layer.attention, (x, mem), device, autocast_dtype)


def profile_attention(args, device, dtype, autocast_dtype) -> dict:
    case = attention_layer(args, device, dtype, autocast_dtype, 4096, 4096)
    case.step()
    return op_shares(case.step)


def print_floor(f: dict) -> None:
    line = (f"floor on this machine: {f['outside_core_flops'] / 1e9:.1f} GFLOP of products outside the core + "
            f"{f['core_floor_flops'] / 1e9:.1f} at the core's floor (blocked today: {f['core_flops'] / 1e9:.1f}), at "
            f"the measured fp32 matmul rate {f['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s, nothing else counted: "
            f">= {f['floor_ms'] / 1e3:.2f} s (the products outside the core alone {f['outside_core_ms'] / 1e3:.2f} s)")
    if "ratio" in f:
        line += f"; the ratio cannot go below {f['ratio']:.2f} here"
    print(line)


def print_core_budget(c: dict) -> None:
    """What the target leaves the core, from the LM timed with a core that costs nothing (bench/free_core.py)."""
    line = (f"outside the core (the same LM with a core that costs nothing, timed in the same rounds): "
            f"{c['outside_core_ms'] / 1e3:.2f} s, so the core takes {(c['lm_ms'] - c['outside_core_ms']) / 1e3:.2f} s")
    if "core_budget_ms" in c:
        line += (f"; that is {c['outside_core_ratio']:.2f} x the official layer, and the target {TARGET_RATIO} leaves "
                 f"the core {c['core_budget_ms'] / 1e3:.2f} s")
    if "floor" in c:
        f = c["floor"]
        line += (f"; its products alone need {f['core_floor_flops'] / f['matmul_flops_per_s']:.2f} s at the matmul "
                 f"rate above (at the floor; {f['core_flops'] / f['matmul_flops_per_s']:.2f} s as blocked issues them)")
    print(line)


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
    p.add_argument("--layer-only", action="store_true", help="only the one-layer LM vs official measurement")
    p.add_argument("--no-layer", action="store_true", help="skip the one-layer LM vs official measurement")
    p.add_argument("--layer-repeat", type=int, default=5, help="timed rounds of the LM vs official comparison")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc serves every block from its heap and keeps what is freed (bench/allocator.py): "
                        "steps stop paying page faults for fresh memory")
    p.add_argument("--official-layer", metavar="PATH",
                   help="NVIDIA/transformer-ls autoregressive/model_lib/layer.py, for the LM vs official comparison")
    p.add_argument("--profile", action="store_true",
                   help="print the attention layer's time by operator (blocked, N = M = 4096)")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        try:
            keep_freed_memory()
        except RuntimeError as e:
            sys.exit(f"bench/attention.py: --keep-freed-memory: {e}")

    device = torch.device(args.device)
    # Half types run as fp32 weights under autocast (the usual mixed-precision training setting).
    dtype = torch.float32
    autocast_dtype = None if args.dtype == "fp32" else DTYPES[args.dtype]
    env = dict(device=str(device), device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                                                 else platform.processor() or platform.machine()),
               threads=torch.get_num_threads(), torch=torch.__version__, dtype=args.dtype,
               date=time.strftime("%Y-%m-%d %H:%M:%S"), hidden=args.hidden, heads=args.heads, window=args.window,
               chunk=args.chunk, rank=args.rank, mem_ratio=args.mem_ratio, repeat=args.repeat,
               keep_freed_memory=args.keep_freed_memory)
    print(f"# {env['device_name']} ({env['device']}, {env['threads']} threads), {args.dtype}, D={args.hidden} "
          f"H={args.heads} w={args.window} c={args.chunk} r={args.rank}, M={args.mem_ratio}*N")

    out = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                      f"attention-{device.type}.json")
    rows: list[dict] = []
    result = dict(env=env, rows=rows, lm_vs_official=None, profile=None)
    if not args.layer_only:
        print(f"{'impl':>14} {'N':>7} {'M':>7} {'B':>3} {'fwd+bwd ms':>11} {'min ms':>9} {'us / token':>12} "
              f"{'mem MiB':>10}")
        attention_rows(args, device, dtype, autocast_dtype, rows, lambda: write_json(out, result))
        kinds = {r["mem_kind"] for r in rows if "mem_kind" in r}
        if kinds:
            print(f"(mem = {', '.join(sorted(kinds))})")
    comparison = profile = None
    if not args.no_layer:
        try:
            comparison = lm_vs_official(args, device, dtype, autocast_dtype)
        except OfficialLayerError as e:
            sys.exit(f"bench/attention.py: {e}")
        runs = ", ".join(f"{t / 1e3:.2f}" for t in comparison["lm_all_ms"])
        print(f"\nwhole one-layer LM, blocked, N=4096 M=4096 B=1 {args.dtype}: {comparison['lm_ms'] / 1e3:.2f} s "
              f"fwd+bwd median (runs {runs})")
        if "ratio" in comparison:
            runs = ", ".join(f"{t / 1e3:.2f}" for t in comparison["official_all_ms"])
            verdict = "within" if comparison["ratio"] <= TARGET_RATIO else "OVER"
            print(f"official attention layer alone: {comparison['official_ms'] / 1e3:.2f} s (runs {runs}); ratio "
                  f"{comparison['ratio']:.2f} ({verdict} the target {TARGET_RATIO})")
        else:
            print(f"official attention layer: {comparison['official']}")
        if "floor" in comparison:
            print_floor(comparison["floor"])
        print_core_budget(comparison)
        line = f"our attention layer alone (blocked, the official layer's scope): {comparison['layer_ms'] / 1e3:.2f} s"
        if "layer_ratio" in comparison:
            line += f", {comparison['layer_ratio']:.2f} x the official layer alone"
        print(line)
        faults = ", ".join(f"{name} {n / 1e3:.0f}k" for name, n in comparison["faults_per_step"].items())
        how = ("glibc keeping freed memory (--keep-freed-memory)" if args.keep_freed_memory else
               "the default allocator; --keep-freed-memory measures without most of them (bench/allocator.py)")
        print(f"page faults per step, median: {faults}; {how}")
    if args.profile:
        profile = profile_attention(args, device, dtype, autocast_dtype)
        print_shares("attention layer (blocked, N=4096 M=4096) forward+backward by operator", profile)

    result.update(lm_vs_official=comparison, profile=profile)
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
