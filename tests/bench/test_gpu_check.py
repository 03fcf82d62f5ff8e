"""bench/gpu_check.sh --dry-run: the GPU check's whole sequence on the CPU at tiny sizes, with `python3` as the only
interpreter on PATH. It must print its caps first (adding up to at most 7 minutes), run every step in order under its
cap, write each benchmark's JSON, and pack every log and result into the one tarball whose path it prints last."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
from repo_paths import REPO_ROOT

ROOT = REPO_ROOT
STEPS = ["python", "probe", "attention_m0", "attention_mN", "attention_table_m0", "attention_table_mN", "pos_mode",
         "train_throughput", "memory", "memory_v100_path", "tests_kernels", "tests_cuda", "tile1", "tile2", "tile3",
         "summary", "tar"]
RUN = [s for s in STEPS if s not in ("python", "pos_mode", "summary", "tar")]  # those with a log and an exit code
BENCH_JSON = ["attention_m0", "attention_mN", "attention_table_m0", "attention_table_mN", "train_throughput",
              "memory", "memory_v100_path"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_dry_run_walks_every_step_into_one_tarball(tmp_path):
    bindir = tmp_path / "bin"  # `python3` only (no `python`): the script must fall back to it
    bindir.mkdir()
    (bindir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bindir / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "TRITON_INTERPRET", "PYTHONPATH")}
    env["PATH"] = f"{bindir}:/usr/bin:/bin"
    # A copy of the repository without its .venv (the script would pick that first: setup_env.sh makes one).
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".venv", ".git", ".torch_extensions", "runs", "data",
                                                               "results", "__pycache__", ".*_cache"))
    out, tgz = tmp_path / "gc", tmp_path / "results" / "gc.tgz"
    r = subprocess.run(["bash", str(repo / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                        "--tarball", str(tgz)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=880)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()

    # The caps come first, add up to at most 420 s, and are the ones each step then runs under, in this order.
    caps = dict(e.split(":") for e in re.fullmatch(r"gpu_check: step caps \(s\): (.*) \| total (\d+) s <= 420 s",
                                                   lines[0])[1].split())
    assert list(caps) == STEPS
    assert sum(map(int, caps.values())) == int(re.search(r"total (\d+) s", lines[0])[1]) <= 420
    assert any(line.startswith("gpu_check: python: python3 ") for line in lines), lines[:3]
    ran = [re.match(r"\[gpu_check \+\d+s\] (\w+) \(cap (\d+) s\)", line).groups() for line in lines
           if line.startswith("[gpu_check +")]
    assert ran == [(name, caps[name]) for name in STEPS]
    assert lines[-1] == f"gpu_check: tarball: {tgz}"

    with tarfile.open(tgz) as tar:
        names = set(tar.getnames())
        for name in RUN:
            assert f"gc/{name}.log" in names, name
        for name in BENCH_JSON:
            assert f"gc/{name}.json" in names, name
        assert {"gc/caps.txt", "gc/rc.txt", "gc/summary.txt", "gc/summary.log"} <= names
        rcs = dict(line.split("=") for line in tar.extractfile("gc/rc.txt").read().decode().split())
        attention = json.load(tar.extractfile("gc/attention_m0.json"))
    assert sorted(rcs) == sorted(RUN)
    assert rcs["probe"] == rcs["attention_m0"] == rcs["attention_mN"] == "0"
    rows = {r["impl"]: r for r in attention["rows"]}
    assert "ms" in rows["fused"] and "ms" in rows["full"]  # the fused kernels ran under the interpreter
    assert rows["window"]["skipped"] == "FlexAttention has no backward on the CPU"
