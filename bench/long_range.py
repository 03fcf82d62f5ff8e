"""Does a trained long-short model use what lies beyond its window?  A key=value recall benchmark.

    flock /work/cpu.lock python bench/long_range.py          # ~12 minutes on 2 CPU cores

1. Writes a synthetic byte corpus (megatron_ls/data/recall_corpus.py): random digits with records ``#QKfQKf..``
   (key QK, value f) and, d bytes after the record's last copy of the value, the query ``?QKf``; d log-uniform
   from w/2 to 32 w. The query's value byte can be predicted only from the record (chance 1/26).
2. Turns it into shards with the project's preprocessing (tools/preprocess_data.py --dataset text).
3. Trains long-short, window-only and full models of the same width, depth, steps and data with the real
   entry (pretrain_char_lm.py, one process), every model alike with the values' loss weighted
   (``--loss-weight a-z=20``) and AdamW's beta2 0.95: at the plain loss the one byte in ~20 that needs the
   record gives little gradient, and the retrieval circuit forms late and partly within minutes of CPU (not at
   all with beta2 0.999; BENCHMARKS.md), so the answers weigh more, as associative-recall benchmarks train on
   their answers alone.
4. Scores each model on the test split by the evaluation protocol (memory carried, context M + N): accuracy of
   its most likely byte at every query's value, per distance bucket [w/2, w), [w, 2w), ... [16w, 32w].

Writes bench/results/long_range-cpu.json and a PNG of accuracy by distance beside it, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_ls.data.recall_corpus import VALUE_ALPHABET, RecallSpec, find_queries, generate  # noqa: E402
from megatron_ls.errors import UserError  # noqa: E402

TYPES = ("long-short", "window", "full")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "long_range"),
                   help="corpus, shards and runs (replaced)")
    p.add_argument("--output", default=os.path.join(ROOT, "bench", "results", "long_range-cpu.json"),
                   help="JSON result; the PNG goes beside it")
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--mem-length", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, help="FFN width of long-short (default 4 x hidden); window-only and full get "
                                            "the width that gives them as many parameters")
    p.add_argument("--batch", type=int, default=8, help="lanes per step")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--adam-beta2", type=float, default=0.95,
                   help="AdamW's beta2 (GPT-3's and nanoGPT's 0.95; at 0.999 long-short's recall beyond the window "
                        "did not form within 1,250 steps where it did at 0.95)")
    p.add_argument("--eval-interval", type=int, default=500)
    p.add_argument("--test-bytes", type=int, default=96_000, help="test split (about one query per 39 bytes)")
    p.add_argument("--mean-gap", type=int, default=2, help="mean filler bytes before each record or query")
    p.add_argument("--value-weight", type=float, default=20.0,
                   help="--loss-weight of the value letters (a-z) in training, every model alike; 1 = plain loss")
    p.add_argument("--max-windows", type=int, default=32, help="longest record-query distance, in windows (a power "
                                                                 "of 2)")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def env() -> dict[str, str]:
    e = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = ROOT + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def build_corpus(a: argparse.Namespace, spec: RecallSpec) -> str:
    """The recall corpus as shards: train holds exactly what the runs read, valid and test follow it."""
    data_dir = os.path.join(a.work_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    train = a.batch * (a.steps * a.seq_length + 1)
    valid = 8 * a.seq_length * a.batch  # a few evaluation steps
    text = os.path.join(data_dir, "recall.txt")
    with open(text, "wb") as f:
        f.write(generate(train + valid + a.test_bytes, spec, seed=a.seed))
    prefix = os.path.join(data_dir, "recall")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--dataset", "text",
                    "--input", text, "--output-prefix", prefix, "--split", f"{train},{valid},{a.test_bytes}",
                    "--overwrite", "--no-progress"], check=True, env=env(), capture_output=True, timeout=300)
    return prefix


def model_config(a: argparse.Namespace, kind: str):
    from megatron_ls.model import TransformerLSConfig

    return TransformerLSConfig(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads,
                               ffn_hidden_size=a.ffn or 4 * a.hidden, window_size=a.window, chunk_size=a.chunk,
                               attention_type=kind)


def train(a: argparse.Namespace, kind: str, prefix: str) -> dict:
    from megatron_ls.training.sizing import equal_size_ffn

    save = os.path.join(a.work_dir, "runs", kind)
    shutil.rmtree(save, ignore_errors=True)
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_char_lm.py"), "--data-path", prefix,
           "--attention-type", kind, "--num-layers", str(a.layers), "--hidden-size", str(a.hidden),
           "--num-attention-heads", str(a.heads), "--ffn-hidden-size", str(equal_size_ffn(model_config(a, kind))),
           "--window-size", str(a.window), "--chunk-size", str(a.chunk),
           "--seq-length", str(a.seq_length), "--mem-length", str(a.mem_length), "--dropout", "0",
           "--micro-batch-size", str(a.batch), "--global-batch-size", str(a.batch), "--train-iters", str(a.steps),
           "--lr", str(a.lr), "--lr-warmup-iters", str(a.warmup), "--lr-decay-style", "cosine",
           "--adam-beta2", str(a.adam_beta2),
           "--min-lr", str(a.lr / 10), "--weight-decay", "0.01", "--log-interval", str(max(1, a.steps // 30)),
           "--eval-interval", str(a.eval_interval), "--eval-iters", "4", "--seed", str(a.seed), "--save", save]
    if a.value_weight != 1:
        cmd += ["--loss-weight", f"{chr(VALUE_ALPHABET[0])}-{chr(VALUE_ALPHABET[-1])}={a.value_weight:g}"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f"long_range.py: training {kind} failed:\n{r.stderr[-3000:]}")
    done = re.search(r"training done: \d+ iterations in ([0-9.]+) s", r.stdout)
    return {"run": save, "wall_seconds": wall, "train_seconds": float(done[1]) if done else None,
            "valid_bpc": _final_valid_bpc(save)}


def _final_valid_bpc(save: str) -> float | None:
    bpc = None
    with open(os.path.join(save, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            bpc = rec.get("valid_bpc", bpc)
    return bpc


def score(a: argparse.Namespace, run: str, prefix: str, edges: list[int], spec: RecallSpec) -> dict:
    from megatron_ls.data.lanes import load_split
    from megatron_ls.inference.model_source import load_model, reconfigure
    from megatron_ls.inference.recall import by_distance, predict_queries

    tokens, _ = load_split(prefix, "test")
    queries = find_queries(tokens, spec.key_length)
    model, _ = load_model(run)
    reconfigure(model, mem_length=a.mem_length, seq_length=None)
    t0 = time.monotonic()
    predicted, probability = predict_queries(model, tokens, queries, a.mem_length + a.seq_length, a.seq_length)
    buckets = by_distance(queries, predicted, probability, edges)
    return {"parameters": model.num_parameters(), "score_seconds": time.monotonic() - t0,
            "buckets": [b.to_dict() for b in buckets]}


def table(result: dict) -> str:
    edges = [(b["low"], b["high"]) for b in next(iter(result["models"].values()))["buckets"]]
    w = result["config"]["window"]
    head = f"{'model':<11} {'params':>8} {'wall s':>7} " + " ".join(f"{_span(lo, hi, w):>10}" for lo, hi in edges)
    lines = [head, "-" * len(head)]
    for kind, m in result["models"].items():
        lines.append(f"{kind:<11} {m['parameters']:>8,} {m['wall_seconds']:>7.0f} "
                     + " ".join(f"{b['accuracy']:>10.1%}" for b in m["buckets"]))
    lines.append(f"{'queries':<28} " + " ".join(f"{b['queries']:>10}"
                                                for b in next(iter(result["models"].values()))["buckets"]))
    lines.append(f"chance {result['chance']:.1%}; distances in units of the window w = {w}")
    return "\n".join(lines)


def _span(lo: int, hi: int, w: int) -> str:
    def f(x: int) -> str:
        return f"{x // w}w" if x % w == 0 else f"w/{w // x}" if w % x == 0 else str(x)

    return f"{f(lo)}-{f(hi)}"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    unknown = [t for t in a.types.split(",") if t not in TYPES]
    if (unknown or a.window % a.chunk or a.seq_length % a.chunk or a.mem_length % a.chunk or a.max_windows < 1
            or a.max_windows & (a.max_windows - 1) or a.mean_gap < 0 or not a.value_weight >= 0):
        print(f"long_range.py: error: --types must be a comma-separated list of {', '.join(TYPES)}, --window, "
              f"--seq-length and --mem-length multiples of --chunk, --max-windows a power of 2, --mean-gap and "
              f"--value-weight >= 0",
              file=sys.stderr)
        return 2
    try:
        return run(a)
    except UserError as e:  # matplotlib missing, a result folder that cannot be written, ...
        print(f"long_range.py: error: {e}", file=sys.stderr)
        return 1


def run(a: argparse.Namespace) -> int:
    t_start = time.monotonic()
    w = a.window
    spec = RecallSpec(min_distance=w // 2, max_distance=a.max_windows * w, mean_gap=a.mean_gap)
    edges = [w // 2] + [w * 2 ** k for k in range(a.max_windows.bit_length())]  # w/2, w, 2w, ... max_windows w
    prefix = build_corpus(a, spec)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
              "config": {k: v for k, v in vars(a).items() if k not in ("work_dir", "output")},
              "corpus": spec.to_dict(), "chance": spec.chance, "models": {}}
    for kind in a.types.split(","):
        m = train(a, kind, prefix)
        m.update(score(a, m["run"], prefix, edges, spec))
        result["models"][kind] = m
        print(f"{kind}: trained in {m['wall_seconds']:.0f} s, " + ", ".join(
            f"{b['low']}-{b['high']}: {b['accuracy']:.1%}" for b in m["buckets"]), flush=True)
    result["total_seconds"] = time.monotonic() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(result, f, indent=1)
    png = os.path.splitext(a.output)[0] + ".png"
    from megatron_ls.plotting.recall_plot import plot_recall

    plot_recall(result, png)
    print(table(result))
    print(f"wrote {a.output} and {png} in {result['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
