"""Peak memory per GPU of a preset under every TP / PP / ZeRO / activation-recomputation layout.

    python bench/memory.py --preset enwik8-30l --seq-length 8192 --mem-length 8192     # the paper's phase 3
    python bench/memory.py --preset enwik8-12l --seq-length 2048 --gpus 4 --precision fp32 --impl blocked
    python bench/memory.py --preset text8-12l --measure-layers 2 --measure-seq 1024    # also measure a slice

Every row is megatron_ls.training.memory_estimate (the analytic count that tests/training/test_memory_estimate.py checks
against the tensors autograd saves and against DeepSpeed's optimizer states) for the most loaded pipeline stage.
With --measure-layers K, a K-layer slice of the preset is also run once on this machine (one process, no
DeepSpeed): on CUDA its peak allocated bytes during forward+backward (torch.cuda.max_memory_allocated) beside the
estimate of the same slice without optimizer; on CPU the bytes saved for the backward beside the estimated
activations. Writes JSON (bench/results/memory-<preset>-N<seq>.json or --output) and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.results_json import write_json  # noqa: E402
from megatron_ls.model import TransformerLSConfig  # noqa: E402
from megatron_ls.model.attention import fused_available  # noqa: E402
from megatron_ls.model.config import PRESETS  # noqa: E402
from megatron_ls.model.lm import TransformerLSLM  # noqa: E402
from megatron_ls.parallel.layout import ParallelLayout  # noqa: E402
from megatron_ls.training.memory_estimate import GiB, TrainingLayout, estimate_memory  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def layouts(config: TransformerLSConfig, gpus: int, micro: int, global_batch: int | None,
            base: dict) -> list[TrainingLayout]:
    out = []
    # Pipeline stages are split by DeepSpeed's own partitioning: without DeepSpeed (a bare GPU image) only PP 1.
    pps = (1, 2, 4, 8) if importlib.util.find_spec("deepspeed") else (1,)
    for tp in (t for t in (1, 2, 4, 8) if gpus % t == 0 and config.num_attention_heads % t == 0):
        for pp in (p for p in pps if gpus % (tp * p) == 0 and p <= config.num_layers):
            dp = gpus // (tp * pp)
            lanes = global_batch or micro * dp
            if lanes % (micro * dp):
                continue
            for zero in (0, 1) if pp > 1 else (0, 1, 2, 3):
                # No recomputation, selective (the blocked core's scores only), full (every layer).
                recompute = ("none", "selective", "full") if base["attention_impl"] == "blocked" else ("none", "full")
                for mode in recompute:
                    out.append(TrainingLayout(micro_batch_size=micro, grad_accum_steps=lanes // (micro * dp),
                                              parallel=ParallelLayout(gpus, tp, pp, zero),
                                              checkpoint_activations=mode == "full",
                                              recompute_attention=mode == "selective", **base))
    return out


def measure_slice(config: TransformerLSConfig, layers: int, seq: int, mem: int, micro: int, precision: str,
                  device: torch.device) -> dict:
    """Run a `layers`-layer slice once (forward+backward) and report measured vs estimated bytes."""
    impl = "fused" if config.attention_impl == "fused" and fused_available(device) else "blocked"
    cfg = TransformerLSConfig(**{**config.to_dict(), "num_layers": layers, "mem_length": mem, "seq_length": None,
                                 "attention_impl": impl})
    model = TransformerLSLM(cfg).to(device=device, dtype=DTYPES[precision]).train()
    tokens = torch.randint(0, cfg.vocab_size, (micro, seq), device=device)
    memory = [torch.randn(micro, mem, cfg.hidden_size, device=device, dtype=DTYPES[precision])
              for _ in range(layers)] if mem else None
    layout = TrainingLayout(micro_batch_size=micro, precision=precision, attention_impl=impl, device=device.type)
    est = estimate_memory(cfg, seq, mem, layout)
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, _ = model(tokens, memory, labels=tokens)
        loss.mean().backward()
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
        # Same quantities on the estimate's side: gradients, activations, the next memory, the backward's transients.
        estimated = est.params + est.activations + est.memory_cache // 2 + est.workspace
        what = "peak allocated during forward+backward beyond weights and memory"
    else:
        seen: dict[int, int] = {}
        exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        exclude |= {m.untyped_storage().data_ptr() for m in memory or []}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in exclude:
                seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = model(tokens, memory, labels=tokens)
        measured, estimated = sum(seen.values()), est.activations
        what = "bytes saved for the backward (activations)"
        del loss
        peak = cpu_peak_bytes(lambda: model(tokens, memory, labels=tokens)[0].mean().backward())
        peak_estimated = est.params + est.activations + est.memory_cache // 2 + est.workspace
    result = {"layers": layers, "seq_length": seq, "mem_length": mem, "micro_batch_size": micro,
              "precision": precision, "attention_impl": impl, "device": device.type, "what": what,
              "measured_bytes": int(measured), "estimated_bytes": int(estimated),
              "ratio": estimated / max(measured, 1), "seconds": time.perf_counter() - t0}
    if device.type == "cpu":
        result.update(profiler_peak_bytes=int(peak), profiler_peak_estimated=int(peak_estimated),
                      profiler_ratio=peak_estimated / max(peak, 1))
    return result


def cpu_peak_bytes(step) -> int:
    """Peak of the bytes the CPU allocator holds during `step`, beyond what it held before (torch.profiler's
    memory events: each carries the running total of allocated bytes)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})]
    return max(totals, default=0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="enwik8-30l", choices=sorted(PRESETS))
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--mem-length", type=int, help="default = --seq-length")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, help="lanes per step [micro x data-parallel size]")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--precision", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--impl", default="fused", choices=("fused", "blocked"), help="the long-short core on the GPUs")
    p.add_argument("--device-gib", type=float, default=32.0, help="memory per GPU the 'fits' column is checked against")
    p.add_argument("--reduce-bucket-size", type=int, default=500_000_000, help="DeepSpeed ZeRO 1/2 bucket (elements)")
    p.add_argument("--overlap-comm", action="store_true",
                   help="ZeRO 1/2 with zero_optimization.overlap_comm (two reduce buckets)")
    p.add_argument("--measure-layers", type=int, default=0, help="also run a slice of this many layers here")
    p.add_argument("--measure-seq", type=int, help="segment length of the measured slice [min(seq, 2048) on CPU]")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output")
    a = p.parse_args()

    mem = a.seq_length if a.mem_length is None else a.mem_length
    config = TransformerLSConfig.from_preset(a.preset, mem_length=mem, attention_impl=a.impl)
    base = dict(precision=a.precision, attention_impl=a.impl, reduce_bucket_size=a.reduce_bucket_size,
                overlap_comm=a.overlap_comm)
    budget = a.device_gib * GiB
    rows = []
    for layout in layouts(config, a.gpus, a.micro_batch_size, a.global_batch_size, base):
        est = estimate_memory(config, a.seq_length, mem, layout)
        rows.append({"layout": layout.describe(), **layout.as_dict(), **est.as_dict(), "fits": est.total <= budget})

    print(f"{a.preset}: N={a.seq_length}, M={mem}, {a.gpus} GPUs, {a.precision}, long-short core '{a.impl}', "
          f"per GPU (most loaded pipeline stage), GiB; fits = under {a.device_gib:g} GiB")
    head = f"{'layout':<44} {'params':>7} {'grads':>7} {'optim':>7} {'buffers':>7} {'activ':>7} {'cache':>7} " \
           f"{'work':>7} {'total':>7}  fits"
    print(head)
    print("-" * len(head))
    for r in rows:
        cols = [r[k] / GiB for k in ("params", "grads", "optimizer", "buffers", "activations", "memory_cache",
                                     "workspace", "total")]
        print(f"{r['layout']:<44} " + " ".join(f"{c:7.2f}" for c in cols) + f"  {'yes' if r['fits'] else 'no'}")
    fitting = [r for r in rows if r["fits"]]
    choice = None
    if fitting:
        # The simplest layout that fits: no model parallelism, the lowest ZeRO stage, recomputation last resort.
        choice = min(fitting, key=lambda r: (r["tp"] * r["pp"], r["checkpoint_activations"], r["recompute_attention"],
                                             r["zero_stage"]))
        print(f"simplest layout that fits {a.device_gib:g} GiB: {choice['layout']} ({choice['total'] / GiB:.2f} GiB)")
    else:
        print(f"no layout fits {a.device_gib:g} GiB per GPU")

    out = a.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"memory-{a.preset}-N{a.seq_length}.json")
    result = {"preset": a.preset, "seq_length": a.seq_length, "mem_length": mem, "gpus": a.gpus,
              "precision": a.precision, "attention_impl": a.impl, "device_gib": a.device_gib, "rows": rows,
              "simplest_fitting": choice["layout"] if choice else None, "measured": None,
              "host": platform.node(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    write_json(out, result)  # the estimate first: a measurement cut short by a time limit loses only itself

    if a.measure_layers:
        device = torch.device(a.device)
        seq = a.measure_seq or (a.seq_length if device.type == "cuda" else min(a.seq_length, 2048))
        measured = measure_slice(config, a.measure_layers, seq, min(mem, seq) if mem else 0, a.micro_batch_size,
                                 a.precision if device.type == "cuda" else "fp32", device)
        print(f"measured {a.measure_layers}-layer slice on {device.type} (N={seq}, M={measured['mem_length']}, "
              f"{measured['precision']}, {measured['attention_impl']}): {measured['what']}: "
              f"{measured['measured_bytes'] / GiB:.3f} GiB measured, {measured['estimated_bytes'] / GiB:.3f} GiB "
              f"estimated (ratio {measured['ratio']:.3f})")
        if "profiler_peak_bytes" in measured:
            print(f"  peak allocated during forward+backward (torch.profiler, weights and memory excluded): "
                  f"{measured['profiler_peak_bytes'] / GiB:.3f} GiB measured, "
                  f"{measured['profiler_peak_estimated'] / GiB:.3f} GiB estimated "
                  f"(ratio {measured['profiler_ratio']:.3f})")

        result["measured"] = measured
        write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
