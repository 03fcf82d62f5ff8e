"""Training logs: one console line per interval, TensorBoard scalars, SAVE/metrics.jsonl.

Only global rank 0 writes (every rank holds the same global loss). metrics.jsonl has one object per
logged iteration (iteration, lm_loss in nats/token, bpc, lr, grad_norm, tokens_per_second, ...)
and one per evaluation (iteration, valid_loss, valid_bpc). On resume the file is cut back to the
checkpoint's iteration so that it reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

LN2 = math.log(2.0)
METRICS_FILE = "metrics.jsonl"


def bpc(nats_per_token: float) -> float:
    """Bits per character (token) from a mean natural-log loss."""
    return nats_per_token / LN2


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def memory_bytes() -> int:
    """Peak accelerator memory on CUDA, else this process's resident memory."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil comes with deepspeed
        return 0


def truncate_metrics(path: str, last_iteration: int) -> None:
    """Drop records after ``last_iteration`` (steps redone after a resume), atomically."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if rec.get("iteration", 0) <= last_iteration:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class TrainingLogger:
    def __init__(self, rank: int, train_iters: int, save_dir: str | None, tensorboard_dir: str | None,
                 resume_iteration: int = 0, args: dict[str, Any] | None = None) -> None:
        self.active = rank == 0
        self.train_iters = train_iters
        self.start_time = time.monotonic()
        self.start_iteration = resume_iteration
        self.metrics = None
        self.writer = None
        if not self.active:
            return
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
            path = os.path.join(save_dir, METRICS_FILE)
            truncate_metrics(path, resume_iteration)
            self.metrics = open(path, "a")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir, purge_step=resume_iteration + 1)
            if args is not None:
                self.writer.add_text("arguments", "\n".join(f"    {k}: {v}" for k, v in sorted(args.items())))

    def print(self, message: str) -> None:
        if self.active:
            print(message, flush=True)

    def _record(self, rec: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(rec) + "\n")
            self.metrics.flush()

    def log_train(self, iteration: int, loss: float, lr: float, grad_norm: float | None, tokens: int,
                  interval_seconds: float, skipped: int = 0, loss_scale: float | None = None) -> None:
        """``loss`` is the mean nats/token over the interval; ``tokens`` the tokens it trained on."""
        if not self.active:
            return
        elapsed = time.monotonic() - self.start_time
        done = iteration - self.start_iteration
        eta = elapsed / done * (self.train_iters - iteration) if done > 0 else float("nan")
        tps = tokens / interval_seconds if interval_seconds > 0 else float("nan")
        mem = memory_bytes()
        gn = f"{grad_norm:.3f}" if grad_norm is not None and math.isfinite(grad_norm) else "n/a"
        width = len(str(self.train_iters))
        line = (f" iteration {iteration:>{width}}/{self.train_iters} | loss {loss:.4f} | bpc {bpc(loss):.4f} | "
                f"lr {lr:.3E} | grad norm {gn} | tokens/s {tps:,.0f} | elapsed {format_duration(elapsed)} | "
                f"ETA {format_duration(eta)} | mem {mem / 2**30:.2f} GiB")
        if loss_scale is not None:  # fp16: Megatron's "loss scale" column
            line += f" | loss scale {loss_scale:g}"
        if skipped:
            line += f" | skipped {skipped}"
        print(line, flush=True)
        rec = {"iteration": iteration, "lm_loss": loss, "bpc": bpc(loss), "lr": lr, "grad_norm": grad_norm,
               "tokens_per_second": tps, "elapsed_seconds": elapsed, "memory_bytes": mem, "skipped": skipped}
        if loss_scale is not None:
            rec["loss_scale"] = loss_scale
        self._record({k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in rec.items()})
        if self.writer is not None:
            w = self.writer
            w.add_scalar("lm-loss-training", loss, iteration)
            w.add_scalar("bpc", bpc(loss), iteration)
            w.add_scalar("learning-rate", lr, iteration)
            if grad_norm is not None and math.isfinite(grad_norm):
                w.add_scalar("grad-norm", grad_norm, iteration)
            if loss_scale is not None:
                w.add_scalar("loss-scale", loss_scale, iteration)
            w.add_scalar("tokens-per-second", tps, iteration)
            w.add_scalar("memory", mem / 2**30, iteration)
            w.flush()

    def log_eval(self, iteration: int, loss: float, tokens: int, seconds: float, final: bool = False) -> None:
        if not self.active:
            return
        kind = "final validation" if final else "validation"
        bar = "-" * 100
        print(f"{bar}\n {kind} at iteration {iteration} | valid loss {loss:.4f} | valid bpc {bpc(loss):.4f} | "
              f"tokens {tokens:,} | {seconds:.1f} s\n{bar}", flush=True)
        self._record({"iteration": iteration, "valid_loss": loss, "valid_bpc": bpc(loss), "valid_tokens": tokens,
                      "final": final})
        if self.writer is not None:
            self.writer.add_scalar("lm-loss-validation", loss, iteration)
            self.writer.add_scalar("valid-bpc", bpc(loss), iteration)
            self.writer.flush()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def print_rank0(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)
