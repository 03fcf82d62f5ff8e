"""tools/evaluate.py: bits per character of a split, the paper's protocol (see megatron_ls/inference/evaluate.py).

    python tools/evaluate.py --model DIR --data-path data/enwik8/enwik8 --split test --context 32768 --step 512
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from megatron_ls.cli.runner import run_cli
from megatron_ls.errors import InferenceError
from megatron_ls.temp_files import sweep, temp_name
from megatron_ls.tool_signals import signal_hook

PROG = "evaluate.py"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="consolidated checkpoint folder, or a training checkpoint")
    p.add_argument("--data-path", required=True, help="shard prefix P (P_test.bin/.idx and P.json)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--context", type=int, default=32768, help="most tokens a prediction conditions on (paper: 32K)")
    p.add_argument("--step", type=int, default=512, help="tokens predicted per forward (paper: 512)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N >= 2 tokens (quick)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--attention-impl", default=None, help="override the model's attention_impl (e.g. blocked)")
    p.add_argument("--output", default=None, help="write the result as JSON here")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from megatron_ls.data.lanes import load_split
    from megatron_ls.data.tokenizers import tokenizer_mismatch
    from megatron_ls.errors import DataError
    from megatron_ls.inference.evaluate import check_protocol, evaluate_stream
    from megatron_ls.inference.model_source import open_model, reconfigure
    from megatron_ls.output_check import check_writable

    if args.max_tokens is not None and args.max_tokens < 2:
        raise InferenceError(f"--max-tokens must be at least 2 (one token to condition on, one to predict), "
                             f"got {args.max_tokens}")
    if args.output:
        check_writable(args.output, "--output")  # before the evaluation, which can take hours
    try:
        tokens, meta = load_split(args.data_path, args.split)
    except (DataError, OSError) as e:
        raise InferenceError(f"cannot read the {args.split} split of {args.data_path}: {e}") from None
    if args.max_tokens is not None:
        tokens = tokens[: args.max_tokens]
    opened = open_model(args.model, device=args.device)
    model, tokenizer = opened.model, opened.tokenizer
    try:
        mem = check_protocol(args.context, args.step, model.config.chunk_size)
    except ValueError as e:
        raise InferenceError(str(e)) from None
    reconfigure(model, mem_length=mem, seq_length=None,
                **({"attention_impl": args.attention_impl} if args.attention_impl else {}))
    vocab = int(meta.get("vocab_size", model.config.vocab_size))
    if vocab != model.config.vocab_size:
        raise InferenceError(f"the shards {args.data_path} have a vocabulary of {vocab} "
                             f"({meta.get('tokenizer', {}).get('type', '?')}), the model {model.config.vocab_size}")
    # Same vocabulary size is not the same tokenizer (two sentencepiece models of 400 pieces): the ids would
    # mean other text, and the score nothing.
    diff = tokenizer_mismatch(tokenizer.describe() if tokenizer is not None else None, meta.get("tokenizer"))
    if diff:
        raise InferenceError(f"the shards {args.data_path} were made with another tokenizer than the model "
                             f"{args.model} (model vs shards: {diff})")
    bar = tqdm(total=max(len(tokens) - 1, 0), unit="tok", unit_scale=True, desc=f"{args.split} BPC",
               disable=args.no_progress, file=sys.stderr)
    try:
        result = evaluate_stream(model, tokens, args.context, args.step, progress=bar.update)
    except ValueError as e:
        raise InferenceError(str(e)) from None
    finally:
        bar.close()
    out = dict(result.to_dict(), model=os.path.abspath(args.model), checkpoint=opened.provenance,
               data_path=args.data_path, split=args.split,
               max_tokens=args.max_tokens, tokens_per_second=result.tokens / max(result.seconds, 1e-9),
               parameters=model.num_parameters(), attention_type=model.config.attention_type)
    print(f"{args.split} bits per character: {result.bpc:.4f} ({result.tokens:,} tokens predicted, context "
          f"{args.context}, step {args.step}, {result.seconds:.1f} s)")
    if args.output:
        write_result(args.output, out)
    return out


def write_result(path: str, result: dict) -> None:
    """PATH as JSON, replaced whole: written beside it under a temporary name first, so a failure or a signal
    leaves the previous file as it was (and no temporary one)."""
    tmp = temp_name(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        sweep([path])  # the temporary files of killed runs
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        signal_hook("evaluate_output")  # test hook: a signal before the new file is in place
        os.replace(tmp, path)
    except OSError as e:
        raise InferenceError(f"cannot write --output {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args), PROG)
