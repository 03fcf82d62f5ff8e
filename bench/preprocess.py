"""Preprocessing speed: tools/preprocess_data.py on enwik8(-like) vs `unzip -p` of the same zip.

    python bench/preprocess.py                       # builds a synthetic enwik8-like zip (100 MB)
    python bench/preprocess.py --input enwik8.zip    # the real one

Both commands run as subprocesses in the same run, writing their output to the same disk; each is
timed --repeat times and the best time is kept. If `unzip` is not installed, Python's zipfile
stream read (to a file) is timed instead, and the JSON says so. Writes bench/results/preprocess.json
(or --output) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "preprocess_data.py")
SIZE = 100_000_000


def make_enwik8_like(path: str, seed: int = 0) -> None:
    """100,000,000 bytes of wiki-markup-like text (Zipf words, tags, digits, some UTF-8), deflated.

    It compresses to about a third like enwik8, so inflating it costs about what enwik8 costs.
    """
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", np.uint8)
    words = [bytes(letters[np.minimum(rng.geometric(0.15, rng.integers(1, 11)), 26) - 1]) for _ in range(30_000)]
    words += [b"[[", b"]]", b"<text>", b"</text>", b"{{cite", b"}}", b"&quot;", b"\n", b"\n\n", b"|",
              "é".encode(), "日本".encode(), b"1999", b"2006", b"=="]
    ids = rng.zipf(1.1, size=20_000_000)
    ids = np.where(ids < len(words), ids, rng.integers(0, len(words), ids.size)) - 1
    data = b" ".join(words[i] for i in ids.tolist())
    while len(data) < SIZE:
        data += data
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("enwik8", data[:SIZE])


def timed(cmd: list[str], stdout_path: str | None = None) -> tuple[float, float]:
    """(wall seconds, peak resident memory in MB) of one subprocess."""
    out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if stdout_path:
            out.close()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {proc.stderr.read().decode(errors='replace').strip()}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="an enwik8.zip (default: build a synthetic enwik8-like one)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--output", default=os.path.join(REPO, "bench", "results", "preprocess.json"))
    p.add_argument("--workdir", help="where outputs go (default: a temporary folder)")
    p.add_argument("--make-zip", metavar="PATH", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.make_zip:
        make_enwik8_like(args.make_zip)
        return 0

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        zpath = args.input
        if zpath is None:
            zpath = os.path.join(tmp, "enwik8.zip")
            t0 = time.perf_counter()
            # In a child process: the parent must stay small, since a forked child's peak RSS
            # (reported by wait4) counts the parent's pages until exec.
            subprocess.run([sys.executable, __file__, "--make-zip", zpath], check=True)
            print(f"built synthetic enwik8-like zip in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        prefix = os.path.join(tmp, "out", "enwik8")
        ours_cmd = [sys.executable, TOOL, "--dataset", "enwik8", "--input", zpath, "--output-prefix", prefix,
                    "--overwrite", "--no-progress"]
        if shutil.which("unzip"):
            base_name = "unzip -p"
            base_cmd = ["unzip", "-p", zpath, "enwik8"]
        else:
            base_name = "python zipfile stream read (unzip not installed)"
            base_cmd = [sys.executable, "-c", "import sys, zipfile, shutil; "
                        "shutil.copyfileobj(zipfile.ZipFile(sys.argv[1]).open('enwik8'), sys.stdout.buffer, 1 << 20)",
                        zpath]
        extracted = os.path.join(tmp, "enwik8.extracted")
        ours, base = [], []
        for _ in range(args.repeat):  # interleaved so both see the same page cache and machine load
            base.append(timed(base_cmd, stdout_path=extracted))
            ours.append(timed(ours_cmd))
        zip_bytes = os.path.getsize(zpath)
        train = os.path.getsize(prefix + "_train.bin")

    best_ours, best_base = min(t for t, _ in ours), min(t for t, _ in base)
    result = {
        "bench": "preprocess",
        "input": "enwik8.zip (given)" if args.input else "synthetic enwik8-like zip",
        "input_zip_bytes": zip_bytes,
        "uncompressed_bytes": SIZE,
        "baseline": base_name,
        "repeat": args.repeat,
        "ours_s": [round(t, 3) for t, _ in ours],
        "baseline_s": [round(t, 3) for t, _ in base],
        "ours_best_s": round(best_ours, 3),
        "baseline_best_s": round(best_base, 3),
        "ours_MBps": round(SIZE / 1e6 / best_ours, 1),
        "baseline_MBps": round(SIZE / 1e6 / best_base, 1),
        "ours_over_baseline_time": round(best_ours / best_base, 2),
        "ours_peak_rss_MB": round(max(r for _, r in ours), 1),
        "train_bin_bytes": train,
        "note": "wall time of each command as a subprocess, interpreter start-up included; best of repeat",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"{'command':<52}{'best s':>8}{'MB/s':>8}")
    print(f"{'preprocess_data --dataset enwik8':<52}{best_ours:>8.2f}{result['ours_MBps']:>8.1f}")
    print(f"{base_name:<52}{best_base:>8.2f}{result['baseline_MBps']:>8.1f}")
    print(f"ratio (ours / baseline time): {result['ours_over_baseline_time']}, "
          f"peak RSS {result['ours_peak_rss_MB']} MB -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
