"""The short table at the end of bench/gpu_check.sh, read from the JSON files its steps wrote.

    python bench/gpu_check_summary.py OUT_DIR            # prints the summary (also written to OUT_DIR/summary.txt)
    python bench/gpu_check_summary.py OUT_DIR --pos-mode # prints the faster window-position mode at N = 32K, M = 0

Every file may be missing or hold only the rows measured before a step's time limit: whatever is there is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TARGETS_MS = {8192: 3.0, 32768: 4.0}  # one layer fwd+bwd, bf16, 32K tokens per step (issue 6)
COLUMNS = (("fused", "fused"), ("fused-table", "fused (table)"), ("full", "full (SDPA)"),
           ("window", "window (FlexAttn)"))


def _load(out: str, name: str) -> dict | None:
    path = os.path.join(out, name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _rows(out: str, mem: str) -> tuple[dict, dict]:
    """{(impl, N): row} of the attention steps for memory `mem` ('m0' or 'mN'), and the run's env."""
    rows, env = {}, {}
    res = _load(out, f"attention_{mem}.json")
    if res:
        env = res["env"]
        rows.update({(r["impl"], r["N"]): r for r in res["rows"]})
    table = _load(out, f"attention_table_{mem}.json")
    if table:
        rows.update({("fused-table", r["N"]): r for r in table["rows"] if r["impl"] == "fused"})
    return rows, env


def pos_mode(out: str) -> str:
    """band or table: whichever ran one layer faster at the largest N measured without memory (band if unknown)."""
    rows, _ = _rows(out, "m0")
    sizes = [n for impl, n in rows if impl in ("fused", "fused-table") and "ms" in rows[(impl, n)]]
    if not sizes:
        return "band"
    n = max(sizes)
    band, table = rows.get(("fused", n), {}).get("ms"), rows.get(("fused-table", n), {}).get("ms")
    return "table" if table is not None and (band is None or table < band) else "band"


def _cell(r: dict) -> str:
    if "ms" in r:
        return f"{r['ms']:8.2f} |{r['mem_mib'] / 1024:5.2f}"
    return ("skipped" if "skipped" in r else "-").rjust(15)


def attention_table(out: str, mem: str) -> list[str]:
    rows, env = _rows(out, mem)
    if not rows:
        return [f"no attention results for M = {'0' if mem == 'm0' else 'N'}"]
    lines = [f"{env.get('device_name', '?')}, {env.get('dtype', '?')}, one layer fwd+bwd, M = "
             f"{'0' if mem == 'm0' else 'N'} (ms | peak GiB; 'window' is FlexAttention's sliding window)",
             f"{'N':>6} {'B':>3} " + " ".join(f"{title:>17}" for _, title in COLUMNS) + "  checks (best fused)"]
    for n in sorted({n for _, n in rows}):
        cells = [rows.get((impl, n), {}) for impl, _ in COLUMNS]
        b = next((c["B"] for c in cells if "B" in c), "")
        fused = min((c for c in cells[:2] if "ms" in c), key=lambda c: c["ms"], default={})
        full = cells[2]
        checks = []
        if "ms" in fused and n in TARGETS_MS:
            checks.append(f"<= {TARGETS_MS[n]} ms: {'PASS' if fused['ms'] <= TARGETS_MS[n] else 'FAIL'}")
        if "ms" in fused and "ms" in full and n >= 4096:
            checks.append(f"vs full: {'PASS' if fused['ms'] <= full['ms'] else 'FAIL'}")
        if "ms" in fused and n == 32768:
            checks.append(f"peak <= 1 GiB: {'PASS' if fused['mem_mib'] <= 1024 else 'FAIL'}")
        lines.append(f"{n:>6} {b:>3} " + " ".join(f"{_cell(c):>17}" for c in cells) + "  " + "; ".join(checks))
    return lines


def throughput_table(out: str) -> list[str]:
    res = _load(out, "train_throughput.json")
    if not res or not res.get("rows"):
        return ["no whole-model throughput results"]
    lines = [f"whole model on {res['device']} (tokens/s; issue 6: long-short >= 1.5x full at 8K, >= 3x at 32K)"]
    by = {(r["attention_type"], r["N"]): r for r in res["rows"]}
    for n in sorted({n for _, n in by}):
        ls, full = by.get(("long-short", n), {}), by.get(("full", n), {})
        ratio = (f"{ls['tokens_per_s'] / full['tokens_per_s']:.2f}x" if "tokens_per_s" in ls and "tokens_per_s" in full
                 else "-")
        cells = [f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else r.get("error", "-") for r in (ls, full)]
        lines.append(f"  N={n:<6} long-short {cells[0]:>12}  full {cells[1]:>12}  ratio {ratio}")
    return lines


def memory_lines(out: str) -> list[str]:
    lines = []
    for name in ("memory.json", "memory_v100_path.json"):
        res = _load(out, name)
        if not res or not res.get("measured"):
            lines.append(f"{name}: no measured slice")
            continue
        m = res["measured"]
        lines.append(f"{name}: {m['layers']}-layer slice, N={m['seq_length']} M={m['mem_length']} {m['precision']} "
                     f"{m['attention_impl']} on {m['device']}: {m['measured_bytes'] / 2**30:.3f} GiB measured, "
                     f"{m['estimated_bytes'] / 2**30:.3f} GiB estimated (ratio {m['ratio']:.3f})")
    return lines


def summary(out: str) -> str:
    lines = ["==================== gpu_check summary ===================="]
    rc_path = os.path.join(out, "rc.txt")
    if os.path.exists(rc_path):
        for line in open(rc_path).read().split("\n"):
            if "=" in line:
                step, rc = line.split("=", 1)
                verdict = "ok" if rc == "0" else "TIMED OUT (its cap)" if rc in ("124", "137") else f"FAILED (rc {rc})"
                lines.append(f"{step:<20} {verdict}")
    for mem in ("m0", "mN"):
        lines += [""] + attention_table(out, mem)
    lines += [""] + throughput_table(out) + [""] + memory_lines(out)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the folder of gpu_check's results")
    p.add_argument("--pos-mode", action="store_true", help="print the faster window-position mode and stop")
    a = p.parse_args()
    if a.pos_mode:
        print(pos_mode(a.out))
        return 0
    text = summary(a.out)
    with open(os.path.join(a.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
