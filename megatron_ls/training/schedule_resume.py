"""The learning-rate schedule of a resumed run: the checkpoint's, unless the user overrides it (Megatron's choice).

DeepSpeed's schedulers checkpoint only their iteration; their shape (peak lr, floor, warm-up, decay length)
comes from the config of the run that loads them. Resuming a finished cosine run with a larger --train-iters
would therefore silently re-stretch the decay (the lr at the next step jumps back up). A checkpoint records
its schedule (the DeepSpeed "scheduler" entry and the optimizer's peak lr); a resume whose flags give another
one keeps the checkpoint's and says so, or with --override-opt_param-scheduler takes the new flags, also saying
what the next update's lr becomes.
"""

from __future__ import annotations

import json
from typing import Any

from .schedules import SCHEDULER_TYPES, scheduler_config


def schedule_of_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The schedule a DeepSpeed config describes: its "scheduler" entry and the optimizer's lr."""
    return {"scheduler": ds_config.get("scheduler"),
            "lr": ((ds_config.get("optimizer") or {}).get("params") or {}).get("lr")}


def schedule_of_checkpoint(info: dict[str, Any], ds_config: dict[str, Any]) -> dict[str, Any] | None:
    """The schedule a checkpoint trained with: recorded since run_state.json has "schedule"; for older ones
    rebuilt from its flags when they alone made it (no DeepSpeed JSON of the user's); else None (unknown)."""
    if info.get("schedule"):
        return info["schedule"]
    run = info.get("run") or {}
    keys = ("lr_decay_style", "lr", "min_lr", "lr_warmup_iters", "train_iters")
    if run.get("deepspeed_config") or any(run.get(k) is None for k in keys) or \
            (ds_config.get("scheduler") or {}).get("type") not in SCHEDULER_TYPES.values():
        return None
    return {"scheduler": scheduler_config(run["lr_decay_style"], run["lr"], run["min_lr"], run["lr_warmup_iters"],
                                          run["train_iters"]), "lr": run["lr"]}


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def lr_at(schedule: dict[str, Any], update: int) -> float | None:
    """The lr of update number UPDATE (1-based, as the run applies it) under a schedule; None if unknown."""
    sched = schedule.get("scheduler") or {}
    try:
        import torch
        from deepspeed.runtime import lr_schedules

        cls = getattr(lr_schedules, sched["type"])
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float(schedule["lr"]))
        scheduler = cls(opt, **(sched.get("params") or {}))
        scheduler.step(update)
        return float(scheduler.get_lr()[0])
    except (KeyError, AttributeError, TypeError, ValueError):
        return None


def _describe(schedule: dict[str, Any]) -> str:
    sched = schedule.get("scheduler") or {}
    params = sched.get("params") or {}
    parts = [str(sched.get("type")), f"lr {schedule.get('lr')}"]
    for k in ("warmup_num_steps", "total_num_steps"):
        if k in params:
            parts.append(f"{k} {params[k]}")
    return ", ".join(parts)


def resolve_schedule(info: dict[str, Any], ds_config: dict[str, Any], override: bool,
                     iteration: int) -> tuple[dict[str, Any] | None, str]:
    """(the schedule to put into the DeepSpeed config, or None to keep this run's; the line to print, or "")."""
    saved = schedule_of_checkpoint(info, ds_config)
    mine = schedule_of_config(ds_config)
    if saved is None or _same(saved, mine):
        return None, ""
    nxt = iteration + 1
    theirs_lr, mine_lr = lr_at(saved, nxt), lr_at(mine, nxt)
    lrs = (f"; the lr of update {nxt} is {theirs_lr:.3g} by the checkpoint's schedule, {mine_lr:.3g} by this run's"
           if theirs_lr is not None and mine_lr is not None else "")
    if override:
        return None, (f"--override-opt_param-scheduler: taking this run's learning-rate schedule ({_describe(mine)}) "
                      f"over the checkpoint's ({_describe(saved)}){lrs}")
    return saved, (f"keeping the checkpoint's learning-rate schedule ({_describe(saved)}); this run's flags describe "
                   f"another ({_describe(mine)}){lrs}. Pass --override-opt_param-scheduler to take the flags")


def apply_schedule(ds_config: dict[str, Any], schedule: dict[str, Any]) -> None:
    ds_config["scheduler"] = schedule["scheduler"]
    if schedule.get("lr") is not None:
        ds_config.setdefault("optimizer", {}).setdefault("params", {})["lr"] = schedule["lr"]
