"""Sequence parallelism on CPU processes: SP=1 against SP=K, side by side in one run, and the bytes each layer moves.

    python bench/sequence_parallel.py                      # 2-layer slice of enwik8-12l, N = M = 16K, SP = 1 and 2
    python bench/sequence_parallel.py --seq-length 8192 --degrees 1,2 --steps 3

Each degree trains the real engine (DeepSpeed, gloo, `blocked` core, fp32) on random tokens with the memory
carried over: K processes of 2/K threads each for SP=K, so the same two cores run every case. It reports the
median step's tokens/s, each rank's peak resident memory (ru_maxrss), and the bytes this rank sent through
DeepSpeed's all-to-all per layer and step (forward and backward, counted on the tensors themselves). Then the
analytic bytes per layer at K = 2, 4, 8 for the preset (parallel/sequence.py's exchange). Writes JSON
(bench/results/sequence_parallel-cpu.json or --output) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ls.model import TransformerLSConfig  # noqa: E402

GiB = 1024 ** 3


def exchange_bytes(config: TransformerLSConfig, B: int, N: int, M: int, k: int, s: int = 2) -> int:
    """Bytes one rank sends per layer and step (forward + backward) in parallel/sequence.py's exchange: (K-1)/K of
    q, k, v (N/K tokens each), the memory's window k and v and both halves' landmarks on the way in, the output on
    the way out, and the same again for the gradients. ``s``: bytes per element (2 for bf16)."""
    D, c, r = config.hidden_size, config.chunk_size, config.chunk_rank
    lm = (M + N) // c * r if config.attention_type == "long-short" else 0
    rows = 3 * N + (2 * M if M else 0) + 2 * lm + N  # summed over the ranks; each sends 1/K of it
    return 2 * B * rows * D * s * (k - 1) // (k * k)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(max(1, args.threads // world))
    from deepspeed.sequence import layer as ulysses

    from megatron_ls.parallel import mpu
    from megatron_ls.training.distributed import init_distributed, layout_for
    from megatron_ls.training.engine import build_engine

    sent = [0]
    forward = ulysses._SeqAllToAll.forward

    def counting(ctx, group, t, *rest):
        sent[0] += t.numel() * t.element_size() * (world - 1) // world
        return forward(ctx, group, t, *rest)

    ulysses._SeqAllToAll.forward = staticmethod(counting)
    config = TransformerLSConfig.from_preset("enwik8-12l", num_layers=args.layers, seq_length=args.seq_length,
                                             mem_length=args.seq_length, attention_impl="blocked", dropout=0.0)
    layout = init_distributed(layout=layout_for(world, config=config, sp=world))
    ds = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}, "steps_per_print": 10**9}
    engine = build_engine(config, ds, layout, seed=1)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, config.vocab_size, (1, args.seq_length + 1), generator=gen)
        sent[0] = 0
        t0 = time.perf_counter()
        engine.train_step(tokens[:, :-1], tokens[:, 1:])
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    result = {"rank": rank, "step_seconds": statistics.median(times), "sent_bytes_per_layer": sent[0] / args.layers,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    mpu.destroy_model_parallel()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-length", type=int, default=16384)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--degrees", default="1,2")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--output")
    a = p.parse_args()
    import tempfile

    rows = []
    print(f"{'SP':>3} {'tokens/s':>10} {'s/step':>8} {'peak GiB/rank':>14} {'sent MiB/layer/rank':>20}")
    for k in (int(x) for x in a.degrees.split(",")):
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(_rank, args=(k, _free_port(), a, out), nprocs=k, start_method="spawn")
            ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(k)]
        step = max(r["step_seconds"] for r in ranks)
        row = {"sp": k, "seq_length": a.seq_length, "layers": a.layers, "tokens_per_second": a.seq_length / step,
               "step_seconds": step, "peak_rss_bytes_per_rank": max(r["peak_rss_bytes"] for r in ranks),
               "sent_bytes_per_layer_per_rank": max(r["sent_bytes_per_layer"] for r in ranks)}
        rows.append(row)
        print(f"{k:>3} {row['tokens_per_second']:>10,.0f} {step:>8.2f} {row['peak_rss_bytes_per_rank'] / GiB:>14.2f} "
              f"{row['sent_bytes_per_layer_per_rank'] / 2**20:>20.1f}")
    config = TransformerLSConfig.from_preset("enwik8-12l")
    analytic = [{"sp": k, "seq_length": n, "bf16_bytes_per_layer_per_rank": exchange_bytes(config, 1, n, n, k)}
                for n in (32768, 1 << 20) for k in (2, 4, 8)]
    print("analytic (enwik8-12l, bf16, B 1, M = N): bytes one rank sends per layer and step")
    for row in analytic:
        print(f"  N {row['seq_length']:>9,}  K {row['sp']}  {row['bf16_bytes_per_layer_per_rank'] / 2**20:10.1f} MiB")
    path = a.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    "sequence_parallel-cpu.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"measured": rows, "analytic": analytic}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
