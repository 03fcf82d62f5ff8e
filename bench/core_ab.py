"""The blocked core against another checkout's, side by side: forward+backward alternated step by step, one process.

    python bench/core_ab.py --against ../main --sizes 2048,4096,8192 --threads 2

Loads `megatron_ls/model/attention/blocked_core.py` from the other checkout (its layout module is this one's: the
two must agree on the geometry) and runs both cores on the same random inputs at N = M, width 512, 8 heads, w 512,
c 16, r 1, fp32. Prints each one's median and minimum, their ratio, and whether outputs and gradients are equal
bit for bit. A speed change to the core is claimed from this, never from times of separate runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.blocked_work import core_inputs  # noqa: E402
from megatron_ls.model.attention import blocked_core  # noqa: E402
from megatron_ls.model.attention.blocked_layout import MAX_SCORES, make_geometry  # noqa: E402

CORE_FILE = os.path.join("megatron_ls", "model", "attention", "blocked_core.py")


def load_core(checkout: str) -> types.ModuleType:
    path = os.path.join(checkout, CORE_FILE)
    if not os.path.isfile(path):
        raise SystemExit(f"bench/core_ab.py: no {CORE_FILE} under {checkout!r}")
    spec = importlib.util.spec_from_file_location("other_blocked_core", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(other: types.ModuleType, n: int, rounds: int, heads: int = 8, dh: int = 64, w: int = 512, c: int = 16,
            r: int = 1) -> dict:
    """Both cores at N = M = n, alternated for `rounds` rounds after one warm-up step each."""
    torch.manual_seed(0)
    args = core_inputs(1, n, n, torch.float32, torch.device("cpu"), heads, dh, w, c, r)
    geo = make_geometry(args[0], args[3].shape[2], args[8].shape[1], window=w, chunk=c, chunk_rank=r, mem_len=n,
                        dropout_p=0.0, softmax_scale=None, block_size=None, max_scores=MAX_SCORES)
    dout = torch.randn(1, heads, n, dh)

    def step(core) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for t in args:
            t.grad = None
        out = core.BlockedCore.apply(geo, False, *args)
        out.backward(dout)
        return out.detach(), [t.grad for t in args]

    cores = {"this": blocked_core, "other": other}
    results = {name: step(core) for name, core in cores.items()}
    (o1, g1), (o2, g2) = results.values()
    bitwise = torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    times: dict[str, list[float]] = {name: [] for name in cores}
    for _ in range(rounds):
        for name, core in cores.items():
            t0 = time.perf_counter()
            step(core)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return dict(N=n, M=n, this_ms=1e3 * med["this"], other_ms=1e3 * med["other"],
                this_min_ms=1e3 * min(times["this"]), other_min_ms=1e3 * min(times["other"]),
                ratio=med["this"] / med["other"], bitwise_equal=bitwise)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", required=True, metavar="CHECKOUT", help="the other checkout's root")
    p.add_argument("--sizes", default="2048,4096,8192", help="comma-separated N (= M)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    other = load_core(args.against)
    print(f"{'N = M':>7} {'this ms':>9} {'other ms':>9} {'this min':>9} {'other min':>10} {'this / other':>13}  "
          f"bitwise equal")
    for n in (int(s) for s in args.sizes.split(",")):
        row = compare(other, n, args.rounds)
        print(f"{n:>7} {row['this_ms']:>9.0f} {row['other_ms']:>9.0f} {row['this_min_ms']:>9.0f} "
              f"{row['other_min_ms']:>10.0f} {row['ratio']:>13.2f}  {'yes' if row['bitwise_equal'] else 'NO'}")


if __name__ == "__main__":
    main()
