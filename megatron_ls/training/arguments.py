"""Command-line arguments of pretrain_char_lm.py, with Megatron's names.

Flags that a preset or a DeepSpeed JSON may also set are parsed with ``None`` as "not given",
so precedence can be resolved afterwards: explicit flag > DeepSpeed JSON / preset > default.
``finalize_args`` applies the defaults and validates everything that can be checked without
reading data or starting processes; every rank computes the same answer, so a bad input fails
on every rank at once instead of leaving some ranks waiting for the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from typing import NoReturn

from megatron_ls.errors import ConfigError
from megatron_ls.parallel.layout import ParallelLayout
from megatron_ls.training.loss_weights import parse_spec

# Model flags: argparse dest -> TransformerLSConfig field (identical names).
MODEL_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "attention_type",
                "attention_impl", "window_size", "chunk_size", "chunk_rank", "mem_length", "dropout",
                "attention_dropout", "max_landmark_distance", "vocab_size")

# Defaults applied after preset / DeepSpeed JSON resolution (None-parsed flags only).
RUN_DEFAULTS: dict[str, object] = {
    "micro_batch_size": 1,
    "lr": 2.5e-4,
    "min_lr": 0.0,
    "lr_warmup_iters": 0,
    "lr_decay_style": "constant",
    "weight_decay": 0.01,
    "clip_grad": 1.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_eps": 1e-8,
    "zero_stage": 0,
    "bf16": False,
    "fp16": False,
}

PROG = "pretrain_char_lm.py"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows a default once, where there is one: "(default: X)" after a flag with a real parse-time default.

    Flags parsed as None (resolved after the preset and the DeepSpeed JSON) state their default in their help
    text; switches (False) and flags without a default show none.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "(default:" in text:
            return text
        return f"{text} (default: %(default)s)".strip()


def _default(value: object) -> str:
    return f"(default: {value})"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Pretrain a Transformer-LS character/byte language model with DeepSpeed.",
                formatter_class=_HelpFormatter)
    from megatron_ls.model.config import ATTENTION_IMPLS, ATTENTION_TYPES, PRESETS, TransformerLSConfig

    fields = TransformerLSConfig.__dataclass_fields__

    def model_default(name: str) -> str:
        return _default(fields[name].default)

    g = p.add_argument_group("model (explicit flags override --preset; the defaults shown apply without one)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="the paper's model (phase-1 segment length)")
    g.add_argument("--num-layers", type=int, help=model_default("num_layers"))
    g.add_argument("--hidden-size", type=int, help=model_default("hidden_size"))
    g.add_argument("--num-attention-heads", type=int, help=model_default("num_attention_heads"))
    g.add_argument("--ffn-hidden-size", type=int, help=_default("4 x --hidden-size"))
    g.add_argument("--attention-type", choices=ATTENTION_TYPES, help=model_default("attention_type"))
    g.add_argument("--attention-impl", choices=ATTENTION_IMPLS,
                   help=f"auto = fused on CUDA compute capability >= 8.0, blocked otherwise (CPU, V100) "
                        f"{model_default('attention_impl')}")
    g.add_argument("--window-size", type=int, help=model_default("window_size"))
    g.add_argument("--chunk-size", type=int, help=model_default("chunk_size"))
    g.add_argument("--chunk-rank", type=int, help=f"landmarks per chunk (r) {model_default('chunk_rank')}")
    g.add_argument("--mem-length", type=int, help=f"tokens of memory per layer {_default('--seq-length')}")
    g.add_argument("--dropout", type=float, help=model_default("dropout"))
    g.add_argument("--attention-dropout", type=float,
                   help=f"on the joint attention probabilities {model_default('attention_dropout')}")
    g.add_argument("--max-landmark-distance", type=int, metavar="D",
                   help="clamp of the landmark distance (in chunks) of the position term: landmarks D or more "
                        "chunks back share one position row (default: no clamp)")
    g.add_argument("--vocab-size", type=int, help="must match the shards' vocabulary (default: the shards')")

    g = p.add_argument_group("run")
    g.add_argument("--seq-length", type=int, help="segment length N (tokens per lane per step); required unless "
                                                  "--preset sets it")
    g.add_argument("--micro-batch-size", type=int,
                   help=f"lanes per micro-batch per data-parallel rank {_default(RUN_DEFAULTS['micro_batch_size'])}")
    g.add_argument("--global-batch-size", type=int,
                   help=f"lanes per step over all data-parallel ranks {_default('micro x data-parallel size')}")
    g.add_argument("--train-iters", type=int, help="optimizer steps in total (required)")
    g.add_argument("--lr", type=float, help=f"peak learning rate {_default(RUN_DEFAULTS['lr'])}")
    g.add_argument("--min-lr", type=float,
                   help=f"floor of the linear / cosine decay {_default(RUN_DEFAULTS['min_lr'])}")
    g.add_argument("--lr-warmup-iters", type=int,
                   help=f"linear warm-up steps {_default(RUN_DEFAULTS['lr_warmup_iters'])}")
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"),
                   help=f"after warm-up {_default(RUN_DEFAULTS['lr_decay_style'])}")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay {_default(RUN_DEFAULTS['weight_decay'])}")
    g.add_argument("--loss-weight", action="append", metavar="CHARS=W",
                   help="scale the training loss of predicting any of CHARS by W (x-y ranges allowed; repeatable), "
                        "e.g. the answers of a synthetic task: a-z=20. The logged training loss is the weighted one; "
                        "validation and test are not weighted (default: every token 1)")
    g.add_argument("--clip-grad", type=float,
                   help=f"gradient-norm clipping, 0 = off {_default(RUN_DEFAULTS['clip_grad'])}")
    g.add_argument("--adam-beta1", type=float, help=_default(RUN_DEFAULTS["adam_beta1"]))
    g.add_argument("--adam-beta2", type=float, help=_default(RUN_DEFAULTS["adam_beta2"]))
    g.add_argument("--adam-eps", type=float, help=_default(RUN_DEFAULTS["adam_eps"]))
    g.add_argument("--bf16", action="store_true", default=None,
                   help="bfloat16 mixed precision; CPU or GPUs of compute capability >= 8.0 (default: fp32)")
    g.add_argument("--fp16", action="store_true", default=None,
                   help="float16 mixed precision with dynamic loss scaling (DeepSpeed's fp16 section); CUDA only, "
                        "the V100's precision")
    g.add_argument("--seed", type=int, default=1234, help="seed of every random number generator")
    g.add_argument("--exit-interval", type=int,
                   help="save and exit when the iteration is a multiple of this (Megatron's flag; for staged runs)")
    g.add_argument("--max-nonfinite-steps", type=int, default=5,
                   help="stop after this many consecutive skipped updates: a NaN/inf loss or NaN/inf gradients "
                        "(the fp16 loss scaler's own overflow skips do not count)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="ranks that split each layer's heads")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="pipeline stages")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron's sequence parallelism inside the TP group: LayerNorms, dropouts and the residual "
                        "stream hold N/tp tokens per rank (all-gather and reduce-scatter in place of TP's all-reduce)")
    g.add_argument("--sequence-parallel-size", type=int, default=1,
                   help="ranks that split one segment's tokens (DeepSpeed-Ulysses: the attention core runs on the "
                        "whole sequence of 1/K of the heads); --seq-length must be a multiple of K x --chunk-size")
    g.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help=_default(RUN_DEFAULTS["zero_stage"]))
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute each layer in the backward (less memory, more compute)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"),
                   help="Megatron's names: full = --checkpoint-activations; selective = keep no attention scores "
                        "for the backward, rebuild them there (the blocked core; the fused kernel never keeps "
                        "them): the layer's memory drops from O(N (w + N/c)) to O(N D) for ~1.3x attention time")
    g.add_argument("--device-memory-gib", type=float,
                   help="memory per device for the start-up memory check (default: CUDA: the card's; CPU: "
                        "available RAM / local processes)")
    g.add_argument("--skip-memory-check", action="store_true",
                   help="start even when the memory estimate exceeds the device (the estimate is still printed)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", help="shard prefix written by tools/preprocess_data.py (PREFIX_train, PREFIX_valid)")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", help="checkpoint directory (also where metrics.jsonl is written)")
    g.add_argument("--load", help="checkpoint directory to resume from (its `latest` tag; without `latest`, its newest "
                                  "complete checkpoint)")
    g.add_argument("--save-interval", type=int, help="save every N iterations (always at the end and on SIGTERM)")
    g.add_argument("--keep-last", type=int, help="keep only the newest N checkpoints (default: all)")
    g.add_argument("--finetune", action="store_true",
                   help="start from the weights of --load (a training checkpoint of any TP x PP x ZeRO layout, or a "
                        "consolidated folder): fresh optimizer, schedule, iteration, data and memory")
    g.add_argument("--override-opt_param-scheduler", "--override-lr-scheduler", action="store_true",
                   dest="override_opt_param_scheduler",
                   help="on a resume, take the learning-rate schedule from this run's flags (--lr, --min-lr, "
                        "--lr-warmup-iters, --lr-decay-style, --train-iters) instead of the checkpoint's (Megatron's "
                        "flag; by default a resume keeps the checkpoint's schedule and says so when the flags differ)")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=1000, help="0 = only at the end")
    g.add_argument("--eval-iters", type=int, default=100,
                   help="steps per evaluation on the valid split; -1 = the whole split, every lane to its end "
                        "(of G lanes, each lane's first token and the split's last len mod G tokens are not "
                        "targets; tools/evaluate.py scores one stream); 0 = no evaluation")
    g.add_argument("--log-interval", type=int, default=100, help="iterations per log line and metrics record")
    g.add_argument("--tensorboard-dir", help="write TensorBoard scalars here")

    g = p.add_argument_group("DeepSpeed")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   help="DeepSpeed JSON; flags fill what it leaves out, a contradiction is an error")
    g.add_argument("--deepspeed", action="store_true", help="accepted for Megatron-DeepSpeed scripts (always on)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK is what is used
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.explicit = {k for k, v in vars(args).items() if v is not None}
    return args


def model_config_dict(args: argparse.Namespace) -> dict:
    """TransformerLSConfig fields from --preset, overridden by explicit model flags (vocab not yet known)."""
    from megatron_ls.model.config import PRESETS, TransformerLSConfig

    base = dict(PRESETS[args.preset]) if args.preset else {}
    if not args.preset:
        defaults = TransformerLSConfig.__dataclass_fields__
        base = {k: defaults[k].default for k in MODEL_FIELDS if k != "vocab_size"}
        base["ffn_hidden_size"] = None  # 4 x hidden unless given
        base["mem_length"] = None
    for k in MODEL_FIELDS:
        v = getattr(args, k)
        if v is not None:
            base[k] = v
    if base.get("ffn_hidden_size") is None:
        base["ffn_hidden_size"] = 4 * base["hidden_size"]
    base.pop("seq_length", None)
    return base


def finalize_args(args: argparse.Namespace, world_size: int | None = None) -> argparse.Namespace:
    """Resolve the preset and defaults and check everything checkable before data and processes."""
    from megatron_ls.model.config import PRESETS

    if world_size is None:
        from .distributed import world_from_env

        world_size = world_from_env()[0]
    args.world_size = world_size

    if not args.data_path:
        raise ConfigError("--data-path is required: the shard prefix written by tools/preprocess_data.py "
                          "(training reads PREFIX_train and PREFIX_valid)")
    if args.seq_length is None:
        if not args.preset:
            raise ConfigError("--seq-length is required (or a --preset that sets it)")
        args.seq_length = PRESETS[args.preset]["seq_length"]
    if args.train_iters is None:
        raise ConfigError("--train-iters is required")

    model = model_config_dict(args)
    # Memory = segment length is the paper's setting; a preset's memory follows --seq-length too.
    if "mem_length" not in args.explicit:
        model["mem_length"] = args.seq_length
    args.model = model

    _positive(args, "train_iters")
    _check_model(model, args.seq_length)
    if args.recompute_granularity == "selective" and args.checkpoint_activations:
        raise ConfigError("--recompute-granularity selective and --checkpoint-activations (full recomputation) "
                          "contradict each other: pick one")
    if args.recompute_granularity == "full":
        args.checkpoint_activations = True
    args.recompute_attention = args.recompute_granularity == "selective"

    # The layout's degrees and rules (the ZeRO stage joins once the DeepSpeed JSON is read: finalize_run_args).
    args.layout = ParallelLayout.build(world_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                       sp=args.sequence_parallel_size, sequence_parallel=args.sequence_parallel,
                                       num_attention_heads=model["num_attention_heads"],
                                       ffn_hidden_size=model["ffn_hidden_size"], num_layers=model["num_layers"])
    if args.sequence_parallel_size > 1:
        _check_sequence_parallel(args.sequence_parallel_size, model, args.seq_length)
    if args.sequence_parallel and args.seq_length % args.tensor_model_parallel_size:
        raise ConfigError(f"--sequence-parallel splits each segment over the {args.tensor_model_parallel_size} "
                          f"tensor-parallel ranks: --seq-length ({args.seq_length}) must be a multiple of it")
    args.data_parallel_size = args.layout.dp

    if args.device_memory_gib is not None and args.device_memory_gib <= 0:
        raise ConfigError(f"--device-memory-gib must be > 0, got {args.device_memory_gib}")
    if args.finetune and not args.load:
        raise ConfigError("--finetune needs --load (the checkpoint whose weights start this run)")
    if args.save_interval is not None and args.save_interval < 1:
        raise ConfigError(f"--save-interval must be >= 1, got {args.save_interval}")
    if args.save_interval is not None and not args.save:
        raise ConfigError("--save-interval needs --save (where to write checkpoints)")
    if args.keep_last is not None and args.keep_last < 1:
        raise ConfigError(f"--keep-last must be >= 1, got {args.keep_last}")
    if args.log_interval < 1:
        raise ConfigError(f"--log-interval must be >= 1, got {args.log_interval}")
    if args.eval_interval < 0 or args.eval_iters < -1:
        raise ConfigError("--eval-interval must be >= 0 and --eval-iters >= -1")
    if args.exit_interval is not None and args.exit_interval < 1:
        raise ConfigError(f"--exit-interval must be >= 1, got {args.exit_interval}")
    if args.max_nonfinite_steps < 1:
        raise ConfigError(f"--max-nonfinite-steps must be >= 1, got {args.max_nonfinite_steps}")
    return args


def finalize_run_args(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults and checks of the optimisation flags, after the DeepSpeed JSON has filled what it sets."""
    for k, v in RUN_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    dp = args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    _positive(args, "micro_batch_size", "global_batch_size")
    if args.global_batch_size % (args.micro_batch_size * dp) != 0:
        raise ConfigError(f"--global-batch-size ({args.global_batch_size}) must be a multiple of "
                          f"--micro-batch-size ({args.micro_batch_size}) x data-parallel size ({dp})")
    args.gradient_accumulation_steps = args.global_batch_size // (args.micro_batch_size * dp)
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0 <= args.min_lr <= args.lr:
        raise ConfigError(f"--min-lr ({args.min_lr}) must be in [0, --lr ({args.lr})]")
    if args.lr_warmup_iters < 0:
        raise ConfigError(f"--lr-warmup-iters must be >= 0, got {args.lr_warmup_iters}")
    for spec in args.loss_weight or ():
        parse_spec(spec)  # the syntax here; the characters against the data's tokenizer once it is read
    if not (math.isfinite(args.clip_grad) and args.clip_grad >= 0):
        raise ConfigError(f"--clip-grad must be a finite number >= 0, got {args.clip_grad}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ConfigError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise ConfigError(f"{_flag(name)} must be in [0, 1), got {getattr(args, name)}")
    if not (math.isfinite(args.adam_eps) and args.adam_eps > 0):
        raise ConfigError(f"--adam-eps must be a finite number > 0, got {args.adam_eps}")
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 (or bf16.enabled and fp16.enabled in --deepspeed_config) are mutually "
                          "exclusive")
    if args.fp16 and not _cuda():
        raise ConfigError("fp16 (--fp16, or fp16.enabled in --deepspeed_config) needs a CUDA GPU (DeepSpeed refuses "
                          "fp16 on CPU); use --bf16 or fp32")
    capability = _cuda_capability() if args.bf16 else None
    if capability is not None and capability < (8, 0):
        raise ConfigError(f"bf16 (--bf16, or bf16.enabled in --deepspeed_config) needs a GPU of compute capability "
                          f">= 8.0; this one is sm_{capability[0]}{capability[1]} (a V100 is sm_70: no bf16): use "
                          "--fp16")
    args.layout = dataclasses.replace(args.layout, zero_stage=args.zero_stage)  # checks ZeRO x pipelines
    return args


def _check_sequence_parallel(sp: int, model: dict, seq_length: int) -> None:
    """What splitting one segment over ``sp`` ranks needs besides the layout's rules (parallel/layout.py)."""
    chunk = model["chunk_size"]
    if seq_length % (sp * chunk):
        raise ConfigError(f"--sequence-parallel-size ({sp}) must divide the chunks of a segment: --seq-length "
                          f"({seq_length}) / --chunk-size ({chunk}) = {seq_length / chunk:g} chunks")
    if model["mem_length"] not in (0, seq_length):
        raise ConfigError(f"--sequence-parallel-size needs --mem-length 0 or equal to --seq-length ({seq_length}), "
                          f"got {model['mem_length']}: each rank then keeps the memory of its own slice of the tokens")
    if model.get("attention_impl") == "reference":
        raise ConfigError("--sequence-parallel-size does not run the 'reference' attention (dense scores, the test "
                          "oracle): use --attention-impl blocked, fused or auto")
    if model.get("attention_type") == "full":
        raise ConfigError("--sequence-parallel-size is for the long-short and window attention, not "
                          "--attention-type full")


def _check_model(model: dict, seq_length: int) -> None:
    """TransformerLSConfig's own validation, its messages in flag names. The vocabulary comes from the shards
    later (the config is built again then); here it is checked only when --vocab-size / --preset sets it."""
    from megatron_ls.model.config import TransformerLSConfig

    try:
        TransformerLSConfig(**{"vocab_size": 1, **model, "seq_length": seq_length})
    except ValueError as e:
        names = "|".join(MODEL_FIELDS + ("seq_length",))
        raise ConfigError(re.sub(rf"\b({names})\b", lambda m: _flag(m.group(1)), str(e))) from None


def _positive(args: argparse.Namespace, *names: str) -> None:
    for k in names:
        v = getattr(args, k)
        if v is None or v < 1:
            raise ConfigError(f"{_flag(k)} must be a positive integer, got {v}")


def _cuda() -> bool:
    if os.environ.get("DS_ACCELERATOR", "") == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def _cuda_capability() -> tuple[int, int] | None:
    """(major, minor) of this process's CUDA device, None when training runs on the CPU."""
    if not _cuda():
        return None
    import torch

    return tuple(torch.cuda.get_device_capability())
