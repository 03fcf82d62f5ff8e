"""The training run: set up (training/startup.py), train, evaluate, save (the entry point is cli/pretrain.py).

Order matters for failing cleanly: everything that reads only the arguments and the shard files
(identical on every rank) is checked before torch.distributed starts, so a bad input stops every
rank with the same message; after that, per-rank work that can fail is agreed across ranks.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any

from megatron_ls.checkpoint.files import tag_name
from megatron_ls.data import LaneDataset
from megatron_ls.errors import TrainingError

from . import checkpointing as ckpt
from .arguments import finalize_args, parse_args
from .collectives import agree, barrier
from .ds_config import build_ds_config, write_ds_config
from .evaluation import evaluate
from .finetune import read_source
from .logging import TrainingLogger, print_rank0
from .loss_weights import token_loss_weights
from .memory_check import check_memory
from .run_folder import check_room, hold_run_folder, state_bytes
from .schedule_resume import apply_schedule, resolve_schedule, schedule_of_config
from .settings import RunSettings
from .signals import StopSignals
from .startup import (
    check_outputs,
    continues_in_place,
    lanes,
    load_data,
    model_config,
    run_info_of,
    should_resume,
    start_state,
)


# ---- the run --------------------------------------------------------------------------------
def train(argv: list[str] | None = None) -> int:
    with contextlib.ExitStack() as held:  # the --save folder's lock, for the whole run
        return _train(argv, held)


def _train(argv: list[str] | None, held: contextlib.ExitStack) -> int:
    from .distributed import init_distributed, world_from_env

    world, rank, _ = world_from_env()
    flags = finalize_args(parse_args(argv), world_size=world)
    on_cpu = os.environ.get("DS_ACCELERATOR", "") == "cpu" or not _cuda_available()
    ds_config = build_ds_config(flags, on_cpu=on_cpu)  # the DeepSpeed JSON fills what the flags leave out
    args = RunSettings.freeze(flags)
    check_outputs(args)
    data = load_data(args)
    train_tokens, valid_tokens, meta = data.train, data.valid, data.meta
    config = model_config(args, meta)
    loss_weights = token_loss_weights(args.loss_weight, data.tokenizer, config.vocab_size,
                                      os.path.dirname(os.path.abspath(args.data_path)))
    # Lane datasets validate sizes before any process waits on another.
    lanes(train_tokens, args, 0, args.data_parallel_size, "train")
    if valid_tokens is not None:
        lanes(valid_tokens, args, 0, args.data_parallel_size, "valid")

    _quiet_deepspeed()
    if on_cpu:
        _share_cpu_cores()
    layout = init_distributed(layout=args.layout)
    held.enter_context(hold_run_folder(args.save, continues_in_place(args)))  # before anything is written
    # Agreed across ranks: free RAM (the CPU default) is read per rank and could tip one rank alone.
    estimate, device_bytes = agree(lambda: check_memory(args, config, ds_config, layout.device.type,
                                                        layout.local_rank), "the memory check")
    print_rank0(estimate.line(device_bytes))
    from .engine import build_engine

    train_data = lanes(train_tokens, args, layout.dp_rank, layout.dp, "train")
    run_info = run_info_of(args, config, data)
    run = run_info["run"] | run_info["layout"] | {"world_size": world}
    resume = should_resume(args)
    located = ckpt.locate_checkpoint(args.load) if resume and not args.finetune else None
    if located is not None:  # DeepSpeed restores a scheduler's iteration, not its shape: keep the checkpoint's
        schedule, line = resolve_schedule(located[1], ds_config, args.override_opt_param_scheduler,
                                          int(located[1].get("iteration", 0)))
        if schedule is not None:
            apply_schedule(ds_config, schedule)
        if line:
            print_rank0(line)
    run_info["schedule"] = schedule_of_config(ds_config)
    source = read_source(args.load, config, run, data.tokenizer) if resume and args.finetune else None
    engine = build_engine(config, ds_config, layout, seed=args.seed,
                          checkpoint_activations=args.checkpoint_activations,
                          recompute_attention=args.recompute_attention,
                          initial_weights=source.weights if source else None)
    engine.set_loss_weights(loss_weights)

    iteration = start_state(args, data, config, run, located, source, engine, train_data)

    if rank == 0 and args.save:
        os.makedirs(args.save, exist_ok=True)
        write_ds_config(ds_config, os.path.join(args.save, "ds_config.json"))
    logger = TrainingLogger(rank, args.train_iters, args.save, args.tensorboard_dir, resume_iteration=iteration,
                            args=run_info["run"])
    _banner(logger, args, config, engine, layout, meta)

    def make_valid() -> LaneDataset:
        return lanes(valid_tokens, args, layout.dp_rank, layout.dp, "valid")

    def save(it: int) -> None:
        local = {"data": train_data.state_dict(), "memory": engine.memory_state_dict(), "rng": ckpt.rng_state()}
        t0 = time.monotonic()
        need = check_room(args.save, it, state_bytes(engine, local))  # stop with the last checkpoint, not mid-save
        path = ckpt.save_checkpoint(engine, args.save, it, local, run_info, keep_last=args.keep_last,
                                    expected_bytes=need)
        logger.print(f"saved checkpoint {path} ({time.monotonic() - t0:.1f} s)")

    tokens_per_step = args.global_batch_size * args.seq_length
    losses: list[float] = []
    steps_in_interval = skipped_in_interval = 0
    nonfinite_streak = 0
    interval_start = time.monotonic()
    last_saved = iteration if args.load and not args.finetune else -1
    stop_reason = ""
    with StopSignals() as signals:
        while iteration < args.train_iters:
            inputs, targets = train_data.next_batch()
            if train_data.is_new_stream:
                engine.reset_memory("train")
            loss = engine.train_step(inputs, targets)
            iteration += 1
            steps_in_interval += 1
            finite = math.isfinite(loss)
            if finite:
                losses.append(loss)
            skipped_in_interval += int(engine.update_skipped or not finite)
            # A skip with a finite loss under fp16 dynamic loss scaling is the scaler lowering its scale: routine.
            # Any other skip (NaN/inf gradients) and every non-finite loss count towards the stop.
            if finite and not (engine.update_skipped and not engine.dynamic_loss_scaling):
                nonfinite_streak = 0
            else:
                nonfinite_streak += 1
                if nonfinite_streak >= args.max_nonfinite_steps:
                    gn = _grad_norm(engine)
                    raise TrainingError(
                        f"the loss or the gradients were NaN/inf for {nonfinite_streak} steps in a row (iterations "
                        f"{iteration - nonfinite_streak + 1}-{iteration}; last loss {loss}, grad norm "
                        f"{'n/a' if gn is None else gn}); every update was skipped, and the run stops here. Lower "
                        "--lr, raise --lr-warmup-iters, use --bf16 instead of --fp16, or resume from the last "
                        "checkpoint.")
            if iteration % args.log_interval == 0 or iteration == args.train_iters:
                elapsed = time.monotonic() - interval_start
                mean = sum(losses) / len(losses) if losses else float("nan")
                logger.log_train(iteration, mean, _lr(engine), _grad_norm(engine), tokens_per_step * steps_in_interval,
                                 elapsed, skipped_in_interval, getattr(engine, "loss_scale", None))
                losses, steps_in_interval, skipped_in_interval = [], 0, 0
                interval_start = time.monotonic()
            if (valid_tokens is not None and args.eval_interval and iteration % args.eval_interval == 0
                    and iteration < args.train_iters):
                result = evaluate(engine, make_valid, args.eval_iters, stop=signals.stop_requested)
                if result is not None:  # None: a stop signal came during it; the save below follows at once
                    logger.log_eval(iteration, *result)
                    interval_start += result[2]
            stop = signals.stop_requested()
            exit_now = args.exit_interval is not None and iteration % args.exit_interval == 0
            if args.save and (stop or exit_now or (args.save_interval and iteration % args.save_interval == 0)):
                t0 = time.monotonic()
                save(iteration)
                last_saved = iteration
                interval_start += time.monotonic() - t0
            if stop or exit_now:
                stop_reason = (f"received {signals.name or 'a stop signal'}" if stop
                               else f"--exit-interval {args.exit_interval}")
                break
        if not stop_reason:
            # Still under the handler: a signal during the final evaluation or save still ends saved, with exit 0.
            result = (evaluate(engine, make_valid, args.eval_iters, stop=signals.stop_requested)
                      if valid_tokens is not None else None)
            if result is not None:
                logger.log_eval(iteration, *result, final=True)
            if args.save and last_saved != iteration:
                save(iteration)
            if signals.stop_requested():
                stop_reason = f"received {signals.name or 'a stop signal'} at the end of training"

    if stop_reason:
        logger.print(f"{stop_reason}: stopped at iteration {iteration}"
                     + (f" after saving {tag_name(iteration)}" if args.save else " (no --save: nothing saved)"))
    else:
        logger.print(f"training done: {iteration} iterations in {time.monotonic() - logger.start_time:.1f} s")
    logger.close()
    barrier()
    return 0


def _banner(logger: TrainingLogger, args: RunSettings, config: Any, engine: Any, layout: Any,
            meta: dict) -> None:
    if not logger.active:
        return
    n_params = sum(p.numel() for p in {id(p): p for p in engine.module.parameters()}.values())
    params = f"{n_params:,}" + (" on rank 0" if layout.tp * layout.pp > 1 else "")
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    tokens = args.global_batch_size * args.seq_length
    logger.print(
        f"Transformer-LS: {config.num_layers} layers, width {config.hidden_size}, {config.num_attention_heads} heads, "
        f"window {config.window_size}, chunk {config.chunk_size} x {config.chunk_rank}, memory {config.mem_length}, "
        f"{config.attention_type}/{_core_impl(config, layout.device)}, vocab {config.vocab_size}, parameters {params}\n"
        f"layout: {layout.parallel.describe()}, "
        f"ZeRO {args.zero_stage}, {precision}, recompute {_recompute_mode(args)}, backend {layout.backend}"
        + (f", loss weights {', '.join(args.loss_weight)}" if args.loss_weight else "") + "\n"
        f"batch: {args.global_batch_size} lanes x {args.seq_length} tokens = {tokens:,} tokens/step "
        f"(micro {args.micro_batch_size}, accumulation {args.gradient_accumulation_steps}); "
        f"data {args.data_path} ({meta.get('dataset', '?')}, train {meta['splits']['train']['tokens']:,} tokens)")


def _core_impl(config: Any, device: Any) -> str:
    """The attention core as configured, and what `auto` picked on this device (by compute capability on CUDA)."""
    if config.attention_type == "full" or config.attention_impl != "auto":
        return config.attention_impl
    from megatron_ls.model.attention import auto_impl

    return f"auto ({auto_impl(device)})"


def _recompute_mode(args: RunSettings) -> str:
    return "full" if args.checkpoint_activations else "selective" if args.recompute_attention else "none"


def _share_cpu_cores() -> None:
    """One process per core group: torch's default (every core in every process) oversubscribes the CPU
    as soon as several ranks share a node, which makes gloo steps tens of times slower."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(local, 1)))


def _quiet_deepspeed() -> None:
    """DeepSpeed logs every setup step at INFO; our logger prints what matters (DS_LOG_LEVEL=info to see them)."""
    import logging

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(getattr(logging, os.environ.get("DS_LOG_LEVEL", "warning").upper(), logging.WARNING))


def _lr(engine: Any) -> float:
    lr = getattr(engine, "lr", None)
    lr = lr() if callable(lr) else lr
    return float(lr) if lr is not None else float("nan")


def _grad_norm(engine: Any) -> float | None:
    g = getattr(engine, "grad_norm", None)
    g = g() if callable(g) else g
    return None if g is None else float(g)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
