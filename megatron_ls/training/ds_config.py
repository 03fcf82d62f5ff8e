"""DeepSpeed's JSON config from the flags, merged with a user's --deepspeed_config.

Merge rule: a value the user's JSON sets fills the flag when the flag was not given; a flag given
explicitly that says something else is an error naming both values; everything the JSON leaves
out is written from the flags (or their defaults). Keys the flags know nothing about pass through.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from typing import Any

from megatron_ls.errors import ConfigError

from .arguments import finalize_run_args
from .schedules import SCHEDULER_TYPES, check_cosine_ratio, scheduler_config, scheduler_flags

# (flag dest, path in the JSON). The optimizer and precision entries are read only when present.
_SCALAR_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("global_batch_size", ("train_batch_size",)),
    ("micro_batch_size", ("train_micro_batch_size_per_gpu",)),
    ("clip_grad", ("gradient_clipping",)),
    ("zero_stage", ("zero_optimization", "stage")),
    ("bf16", ("bf16", "enabled")),
    ("fp16", ("fp16", "enabled")),
    ("lr", ("optimizer", "params", "lr")),
    ("weight_decay", ("optimizer", "params", "weight_decay")),
    ("adam_eps", ("optimizer", "params", "eps")),
)

# fp16: DeepSpeed's dynamic loss scaling (loss_scale 0) as Megatron-DeepSpeed's recipes set it: start at 2^11, halve
# on an overflow after `hysteresis` of them, double after `loss_scale_window` clean steps. A user's JSON may set any.
FP16_LOSS_SCALING = {"loss_scale": 0, "initial_scale_power": 11, "loss_scale_window": 500, "hysteresis": 2,
                     "min_loss_scale": 1}

STEPS_PER_PRINT = 10**9  # our logger prints; DeepSpeed's own step log stays quiet


def load_user_config(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed_config {path}: file not found")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--deepspeed_config {path}: the top level must be a JSON object")
    return cfg


def _get(cfg: dict, path: tuple[str, ...]) -> Any:
    node: Any = cfg
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set(cfg: dict, path: tuple[str, ...], value: Any) -> None:
    node = cfg
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node.setdefault(path[-1], value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _conflict(flag: str, flag_value: Any, where: str, json_value: Any, source: str) -> ConfigError:
    return ConfigError(f"--{flag.replace('_', '-')} {flag_value} contradicts {where} = {json_value} in {source}; "
                       "remove one of them or make them agree")


# Entries the flags read, with the type and range DeepSpeed needs: a wrong one is named here, not deep inside
# DeepSpeed (a string "false" would even read as true).
_OBJECTS = ("zero_optimization", "optimizer", "bf16", "fp16")
_TYPED: tuple[tuple[tuple[str, ...], str], ...] = (
    (("train_batch_size",), "count"), (("train_micro_batch_size_per_gpu",), "count"),
    (("gradient_accumulation_steps",), "count"), (("gradient_clipping",), "number"),
    (("zero_optimization", "stage"), "stage"), (("bf16", "enabled"), "bool"), (("fp16", "enabled"), "bool"),
    (("optimizer", "params", "lr"), "number"), (("optimizer", "params", "weight_decay"), "number"),
    (("optimizer", "params", "eps"), "number"),
    (("fp16", "loss_scale"), "non-negative"), (("fp16", "initial_scale_power"), "count"),
    (("fp16", "loss_scale_window"), "count"), (("fp16", "hysteresis"), "count"),
    (("fp16", "min_loss_scale"), "non-negative"),
)


def check_user_types(cfg: dict, source: str) -> None:
    """Raise on an entry of the wrong JSON type or range, naming it."""
    for key in _OBJECTS:
        if key in cfg and not isinstance(cfg[key], dict):
            raise ConfigError(f"{source}: \"{key}\" must be a JSON object, got {json.dumps(cfg[key])}")
    params = _get(cfg, ("optimizer", "params"))
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: optimizer.params must be a JSON object, got {json.dumps(params)}")
    for path, kind in _TYPED:
        value = _get(cfg, path)
        if value is None:
            continue
        where = ".".join(path)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{source}: {where} must be true or false, got {json.dumps(value)}")
        if kind == "number" and not (number and math.isfinite(value)):
            raise ConfigError(f"{source}: {where} must be a finite number, got {json.dumps(value)}")
        if kind == "non-negative" and not (number and math.isfinite(value) and value >= 0):
            raise ConfigError(f"{source}: {where} must be a finite number >= 0, got {json.dumps(value)}")
        if kind == "count" and not (number and value == int(value) and value >= 1):
            raise ConfigError(f"{source}: {where} must be a positive integer, got {json.dumps(value)}")
        if kind == "stage" and (isinstance(value, bool) or value not in (0, 1, 2, 3)):
            raise ConfigError(f"{source}: {where} must be 0, 1, 2 or 3, got {json.dumps(value)}")


def absorb_user_config(args: argparse.Namespace, cfg: dict, source: str) -> None:
    """Fill flags the user did not give from the JSON; raise on a contradiction."""
    check_user_types(cfg, source)
    given = args.explicit

    def take(dest: str, value: Any, where: str) -> None:
        if value is None:
            return
        if dest in given and getattr(args, dest) is not None:
            if not _same(getattr(args, dest), value):
                raise _conflict(dest, getattr(args, dest), where, value, source)
        else:
            setattr(args, dest, value)

    for dest, path in _SCALAR_KEYS:
        take(dest, _get(cfg, path), ".".join(path))
    betas = _get(cfg, ("optimizer", "params", "betas"))
    if betas is not None:
        if not (isinstance(betas, list) and len(betas) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)):
            raise ConfigError(f"{source}: optimizer.params.betas must be a list of two numbers, got {betas}")
        take("adam_beta1", betas[0], "optimizer.params.betas[0]")
        take("adam_beta2", betas[1], "optimizer.params.betas[1]")
    sched = cfg.get("scheduler")
    if sched is not None:
        for dest, (value, where) in scheduler_flags(sched, source).items():
            take(dest, value, where)
        total = _get(sched, ("params", "total_num_steps"))
        if total is not None and not _same(total, args.train_iters):
            raise _conflict("train_iters", args.train_iters, "scheduler.params.total_num_steps", total, source)
    gas = cfg.get("gradient_accumulation_steps")
    if gas is not None and args.global_batch_size is None:
        micro = args.micro_batch_size if args.micro_batch_size is not None else 1
        args.global_batch_size = micro * gas * args.data_parallel_size


def build_ds_config(args: argparse.Namespace, on_cpu: bool) -> dict[str, Any]:
    """The JSON handed to deepspeed.initialize. Also completes ``args`` (defaults, batch sizes)."""
    user: dict[str, Any] = {}
    source = "the DeepSpeed config"
    if args.deepspeed_config:
        source = args.deepspeed_config
        user = load_user_config(args.deepspeed_config)
        absorb_user_config(args, user, source)
    finalize_run_args(args)
    if "scheduler" in user:
        check_cosine_ratio(user["scheduler"], args.min_lr, args.lr, "min_lr" in args.explicit, source)

    cfg = copy.deepcopy(user)
    gas = cfg.get("gradient_accumulation_steps")
    if gas is not None and gas != args.gradient_accumulation_steps:
        raise ConfigError(
            f"{source}: gradient_accumulation_steps = {gas} but --global-batch-size {args.global_batch_size} / "
            f"(--micro-batch-size {args.micro_batch_size} x data-parallel size {args.data_parallel_size}) = "
            f"{args.gradient_accumulation_steps}")
    cfg["train_batch_size"] = args.global_batch_size
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    cfg["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    cfg.setdefault("steps_per_print", STEPS_PER_PRINT)
    _set(cfg, ("gradient_clipping",), args.clip_grad)
    _set(cfg, ("zero_optimization", "stage"), args.zero_stage)
    _set(cfg, ("bf16", "enabled"), bool(args.bf16))
    _set(cfg, ("fp16", "enabled"), bool(args.fp16))
    if cfg["fp16"]["enabled"]:
        for key, value in FP16_LOSS_SCALING.items():
            _set(cfg, ("fp16", key), value)

    opt = cfg.setdefault("optimizer", {"type": "AdamW"})
    opt.setdefault("type", "AdamW")
    params = opt.setdefault("params", {})
    params.setdefault("lr", args.lr)
    params.setdefault("betas", [args.adam_beta1, args.adam_beta2])
    params.setdefault("eps", args.adam_eps)
    params.setdefault("weight_decay", args.weight_decay)
    if str(opt["type"]).lower() in ("adam", "adamw"):
        # torch's Adam(W) needs no build (DeepSpeed's FusedAdam is JIT-compiled with nvcc at start-up, and is a
        # CUDA op); on CUDA its fused kernel updates every parameter of the step in one launch, as FusedAdam does.
        params.setdefault("torch_adam", True)
        if params["torch_adam"] and not on_cpu:
            params.setdefault("fused", True)

    if "scheduler" not in cfg:
        cfg["scheduler"] = scheduler_config(args.lr_decay_style, args.lr, args.min_lr, args.lr_warmup_iters,
                                            args.train_iters)
    elif cfg["scheduler"].get("type") in SCHEDULER_TYPES.values():
        # Fill what the user's scheduler leaves out from the (now resolved) flags.
        full = scheduler_config(args.lr_decay_style, args.lr, args.min_lr, args.lr_warmup_iters, args.train_iters)
        for k, v in full["params"].items():
            cfg["scheduler"].setdefault("params", {}).setdefault(k, v)
    return cfg


def write_ds_config(cfg: dict[str, Any], path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
