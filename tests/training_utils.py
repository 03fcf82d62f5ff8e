"""Helpers for the end-to-end training tests: tiny shards, launching pretrain_char_lm.py, reading metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "pretrain_char_lm.py")

# A tiny model: 2 layers, width 32, segments of 32 tokens in chunks of 8 (seconds per run on 2 cores).
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--ffn-hidden-size", "64",
        "--window-size", "16", "--chunk-size", "8", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--lr", "3e-3", "--lr-warmup-iters", "2", "--dropout", "0.1",
        "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "2", "--seed", "7"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("MEGATRON_LS_TEST_CRASH_IN_SAVE", None)
    e.pop("MEGATRON_LS_TEST_SIGNAL", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE"):
        e.pop(k, None)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_shards(prefix: str) -> str:
    """The embedded default corpus, preprocessed (byte level, vocabulary 256)."""
    if not os.path.exists(prefix + ".json"):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--dataset", "default",
                        "--output-prefix", prefix, "--no-progress"], check=True, env=env(), timeout=120,
                       capture_output=True)
    return prefix


def run(args: list[str], timeout: float = 120, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """pretrain_char_lm.py as one plain `python` process."""
    e = env()
    e.update(extra_env or {})
    return subprocess.run([sys.executable, SCRIPT, *args], env=e, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def deepspeed(launcher_args: list[str], args: list[str], timeout: float = 180,
              extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = env()
    e.update(extra_env or {})
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), *launcher_args, SCRIPT, *args]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def popen_deepspeed(launcher_args: list[str], args: list[str], extra_env: dict[str, str] | None = None,
                    **popen: object) -> subprocess.Popen:
    """The real `deepspeed` launcher, running in the background."""
    e = env()
    e.update(extra_env or {})
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), *launcher_args, SCRIPT, *args]
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen(cmd, env=e, text=True, cwd=ROOT, **popen)


def wait_for_metrics(save_dir: str, lines: int, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    """Until SAVE/metrics.jsonl has LINES records (training runs); fails if a process ends first."""
    path, deadline = os.path.join(save_dir, "metrics.jsonl"), time.monotonic() + timeout
    while not (os.path.exists(path) and len(open(path).readlines()) >= lines):
        assert all(p.poll() is None for p in procs), "a process ended before training was under way"
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)


def spawn_ranks(args: list[str], world: int, extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """`world` plain processes with the launcher's environment: each rank's exit status and stderr apart."""
    port = free_port()
    procs = []
    for rank in range(world):
        e = env()
        e.update(extra_env or {})
        e.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, SCRIPT, *args], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) per process; kills everything and fails on a hang."""
    deadline = time.monotonic() + timeout
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, o, e))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        raise AssertionError(f"ranks still running after {timeout:.0f} s: a hang") from None
    return out


def metrics(save_dir: str) -> list[dict]:
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(save_dir: str) -> list[tuple[int, float]]:
    return [(r["iteration"], r["lm_loss"]) for r in metrics(save_dir) if "lm_loss" in r]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "pretrain_char_lm.py: error:" in line]
