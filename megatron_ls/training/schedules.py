"""Learning-rate schedules as DeepSpeed scheduler JSON (DeepSpeed builds, steps and checkpoints them).

--lr-decay-style -> DeepSpeed scheduler, each with a linear warm-up over --lr-warmup-iters:
  constant -> WarmupLR       0 -> lr, then lr (the paper's schedule)
  linear   -> WarmupDecayLR  min_lr -> lr, then linearly down to min_lr at --train-iters
  cosine   -> WarmupCosineLR 0 -> lr, then a half cosine down to min_lr at --train-iters
DeepSpeed's warm-up schedulers apply their step-0 rate to the first two updates (the constructor and the first
step() both leave the iteration at 0): start_at_first_update() moves them on, so update k of W warm-up updates
runs at lr * k / W (nanoGPT's ramp; no update at lr 0) and a decay is at min_lr by update --train-iters.
With --lr-warmup-iters 0 or 1 the constant and cosine schedules start at lr (the warm-up start is set to lr).
"""

from __future__ import annotations

from typing import Any

from megatron_ls.errors import ConfigError

SCHEDULER_TYPES = {"constant": "WarmupLR", "linear": "WarmupDecayLR", "cosine": "WarmupCosineLR"}
_STYLE_OF = {v: k for k, v in SCHEDULER_TYPES.items()}


def start_at_first_update(scheduler: Any) -> None:
    """Step a fresh DeepSpeed warm-up scheduler to iteration 1, the rate of the first update.

    Any other scheduler (OneCycle, a user's own, none) is left alone. A resumed run then loads the saved
    iteration over this one, so resuming does not shift the schedule.
    """
    if type(scheduler).__name__ in _STYLE_OF and getattr(scheduler, "last_batch_iteration", None) == -1:
        scheduler.step(1)


def scheduler_config(style: str, lr: float, min_lr: float, warmup: int, total: int) -> dict[str, Any]:
    """DeepSpeed's "scheduler" entry for a decay style."""
    steps = max(1, warmup)  # DeepSpeed requires a positive count (and warms up over at least 2)
    # With our start at iteration 1, one warm-up update would already run at lr: start there.
    if style == "constant":
        params = {"warmup_min_lr": 0.0 if warmup > 1 else lr, "warmup_max_lr": lr, "warmup_num_steps": steps,
                  "warmup_type": "linear"}
    elif style == "linear":
        params = {"warmup_min_lr": min_lr, "warmup_max_lr": lr, "warmup_num_steps": steps,
                  "total_num_steps": total, "warmup_type": "linear"}
    elif style == "cosine":
        params = {"warmup_min_ratio": 0.0 if warmup > 1 else 1.0, "cos_min_ratio": min_lr / lr,
                  "warmup_num_steps": steps, "total_num_steps": total, "warmup_type": "linear"}
    else:
        raise ConfigError(f"--lr-decay-style must be constant, linear or cosine, got {style!r}")
    return {"type": SCHEDULER_TYPES[style], "params": params}


def scheduler_flags(sched: Any, source: str) -> dict[str, tuple[Any, str]]:
    """What a user's "scheduler" entry says about the flags: {dest: (value, where)}.

    A scheduler type we do not map (OneCycle, LRRangeTest, ...) is used as given, but then the
    schedule flags cannot also be given: the style reported is its type, which no flag equals.
    """
    if not isinstance(sched, dict) or "type" not in sched:
        raise ConfigError(f"{source}: \"scheduler\" must be an object with a \"type\"")
    kind, params = sched["type"], sched.get("params", {}) or {}
    out: dict[str, tuple[Any, str]] = {"lr_decay_style": (_STYLE_OF.get(kind, kind), "scheduler.type")}
    if "warmup_num_steps" in params:
        out["lr_warmup_iters"] = (params["warmup_num_steps"], "scheduler.params.warmup_num_steps")
    if kind in ("WarmupLR", "WarmupDecayLR") and "warmup_max_lr" in params:
        out["lr"] = (params["warmup_max_lr"], "scheduler.params.warmup_max_lr")
    if kind == "WarmupDecayLR" and "warmup_min_lr" in params:
        out["min_lr"] = (params["warmup_min_lr"], "scheduler.params.warmup_min_lr")
    return out


def check_cosine_ratio(sched: dict, min_lr: float, lr: float, min_lr_given: bool, source: str) -> None:
    """WarmupCosineLR states the floor as a ratio of lr: compare it once lr is resolved."""
    if sched.get("type") != "WarmupCosineLR" or not min_lr_given:
        return
    ratio = (sched.get("params") or {}).get("cos_min_ratio")
    if ratio is not None and abs(ratio * lr - min_lr) > 1e-12 * max(1.0, lr):
        raise ConfigError(f"--min-lr {min_lr} contradicts scheduler.params.cos_min_ratio = {ratio} "
                          f"(x lr {lr} = {ratio * lr}) in {source}; remove one of them or make them agree")
