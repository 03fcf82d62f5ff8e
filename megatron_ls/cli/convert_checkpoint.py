"""tools/convert_checkpoint.py: training checkpoint <-> consolidated inference checkpoint, and TP/PP resharding.

    --load CKPT_DIR --output DIR                              training (any TP x PP x ZeRO) -> consolidated
    --load DIR --output CKPT_DIR --target-tp N --target-pp M  consolidated (or training) -> training layout
"""

from __future__ import annotations

import argparse
import os

import torch

from megatron_ls.cli.runner import run_cli
from megatron_ls.errors import CheckpointError, ConfigError

PROG = "convert_checkpoint.py"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="a training checkpoint folder (with 'latest') or a consolidated one")
    p.add_argument("--output", required=True, help="the folder to write")
    p.add_argument("--target-tp", type=int, default=None, help="write a training layout with this TP degree")
    p.add_argument("--target-pp", type=int, default=None, help="... and this pipeline degree")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights of the consolidated checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --output")
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> str:
    from megatron_ls.checkpoint.consolidated import check_weights, is_consolidated, save_consolidated
    from megatron_ls.checkpoint.reader import is_training_checkpoint
    from megatron_ls.checkpoint.source import read_weights
    from megatron_ls.output_check import check_writable

    to_training = args.target_tp is not None or args.target_pp is not None
    tp = 1 if args.target_tp is None else args.target_tp
    pp = 1 if args.target_pp is None else args.target_pp
    if tp < 1 or pp < 1:
        raise ConfigError("--target-tp and --target-pp must be positive")
    if not os.path.isdir(args.load):
        raise CheckpointError(f"--load {args.load}: folder not found")
    if not to_training and is_consolidated(args.load):
        raise ConfigError(f"--load {args.load} is already a consolidated checkpoint; pass --target-tp / "
                             "--target-pp to write a training layout from it")
    if not is_consolidated(args.load) and not is_training_checkpoint(args.load):
        raise CheckpointError(f"--load {args.load} holds no checkpoint: no 'latest' file naming a training checkpoint "
                             "and no config.json + model.safetensors")
    check_writable(args.output, "--output", folder=True)  # before the reading, which can be long
    existing = [n for n in ("latest", "model.safetensors") if os.path.exists(os.path.join(args.output, n))]
    if existing and not args.overwrite:
        raise ConfigError(f"--output {args.output} already holds a checkpoint ({existing[0]}); pass --overwrite")
    src = read_weights(args.load)
    state, config, tokenizer, base = src.state, src.config, src.tokenizer, src.tokenizer_base_dir
    if to_training:
        from megatron_ls.checkpoint.writer import write_training_checkpoint

        if tokenizer and tokenizer.get("type") == "sentencepiece" and not os.path.isabs(tokenizer["model"]):
            tokenizer = dict(tokenizer, model=os.path.abspath(os.path.join(base, tokenizer["model"])))
        path = write_training_checkpoint(args.output, state, config, tokenizer, tp, pp, src.iteration,
                                         source=args.load)
        return f"wrote a TP={tp} x PP={pp} training checkpoint (weights only: resume it with --finetune) to {path}"
    check_weights(state, config, f"the weights of {args.load}")
    state = {k: v.to(DTYPES[args.dtype]) if v.is_floating_point() else v for k, v in state.items()}
    save_consolidated(args.output, state, config, tokenizer, tokenizer_base_dir=base, source=src.provenance)
    n = sum(v.numel() for v in state.values())
    return f"wrote the consolidated checkpoint ({n:,} parameters, {args.dtype}) to {args.output}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: print(convert(args)), PROG)
