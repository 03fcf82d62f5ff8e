"""tools/generate.py: sample a continuation of a prompt from a consolidated (or training) checkpoint.

    python tools/generate.py --model DIR --prompt "The " --max-new-tokens 200 --temperature 0.8 --top-k 40
    printf 'text' | python tools/generate.py --model DIR --prompt - ...   (stdin)
    python tools/generate.py --model DIR --prompt-file prompt.txt ...

A prompt from stdin or a file is taken as it is, a final newline included (echo adds one, which text8's
alphabet does not have: use printf). A byte-level model takes any bytes; other tokenizers need UTF-8.

The decoder keeps per layer the window keys/values, the landmarks of completed chunks and the open
chunk, so each new token costs O(window + landmarks), and follows the model's segment-with-memory
semantics (--segment-length / --mem-length; 0 segment length = one segment from the prompt start).
"""

from __future__ import annotations

import argparse
import math
import sys

from megatron_ls.cli.runner import run_cli
from megatron_ls.errors import InferenceError

PROG = "generate.py"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="consolidated checkpoint folder (or a training checkpoint)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text; '-' reads it from stdin")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--segment-length", type=int, default=None,
                   help="segment length N of the memory semantics (default: the model's seq_length; 0 = unbounded)")
    p.add_argument("--mem-length", type=int, default=None, help="memory length M (default: the model's mem_length)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="print only the text (no statistics on stderr)")
    p.add_argument("--only-new", action="store_true", help="print only the generated continuation")
    return p.parse_args(argv)


def read_prompt(args: argparse.Namespace) -> bytes | str:
    """The prompt as given: the bytes of the file or of stdin (how to read them is the tokenizer's business),
    or the --prompt text."""
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                return f.read()
        except OSError as e:
            raise InferenceError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}") from None
    if args.prompt == "-":
        stdin = getattr(sys.stdin, "buffer", None)  # a replaced sys.stdin may be text only
        return stdin.read() if stdin is not None else sys.stdin.read()
    return args.prompt


def prompt_source(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        return f"--prompt-file {args.prompt_file}"
    return "the prompt on stdin" if args.prompt == "-" else "--prompt"


def encode_prompt(tokenizer, prompt: bytes | str, source: str = "the prompt") -> list[int]:
    """Token ids of the prompt. A byte-level model takes any bytes as they are (undecodable bytes of --prompt,
    which Python keeps as lone surrogates, as the bytes they were); the other tokenizers read UTF-8 text."""
    from megatron_ls.data.tokenizers import ByteTokenizer
    from megatron_ls.errors import DataError

    if isinstance(tokenizer, ByteTokenizer):
        if isinstance(prompt, str):
            prompt = prompt.encode("utf-8", errors="surrogateescape")
    else:
        try:
            prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else prompt
            prompt.encode("utf-8")  # lone surrogates: bytes of the command line that were not UTF-8
        except UnicodeError as e:
            raise InferenceError(f"{source} is not valid UTF-8 (at offset {e.start:,}); only a byte-level model "
                                 "takes arbitrary bytes") from None
    try:
        ids = tokenizer.encode(prompt)
    except (DataError, UnicodeError) as e:
        raise InferenceError(f"the prompt cannot be encoded for this model's vocabulary: {e}") from None
    return [int(i) for i in ids]


def run(args: argparse.Namespace) -> None:
    from megatron_ls.inference.context import ContextRule
    from megatron_ls.inference.generate import generate
    from megatron_ls.inference.model_source import describe_provenance, open_model

    if args.max_new_tokens < 0:
        raise InferenceError("--max-new-tokens must be >= 0")
    # nan fails every comparison, and inf would sample uniformly: both are refused here.
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise InferenceError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise InferenceError(f"--top-p must be in (0, 1] (1 = off), got {args.top_p}")
    if args.top_k < 0:
        raise InferenceError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    text = read_prompt(args)
    opened = open_model(args.model, device=args.device)
    model, tokenizer = opened.model, opened.tokenizer
    if tokenizer is None:
        raise InferenceError(f"{args.model} has no tokenizer description (tokenizer.json)")
    prompt = encode_prompt(tokenizer, text, prompt_source(args))
    if not prompt:
        raise InferenceError("the prompt is empty: give at least one character")
    cfg = model.config
    seg = cfg.seq_length if args.segment_length is None else (args.segment_length or None)
    mem = cfg.mem_length if args.mem_length is None else args.mem_length
    try:
        rule = ContextRule(seg, mem)
        out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, rule)
    except ValueError as e:
        raise InferenceError(str(e)) from None
    sys.stdout.write(tokenizer.decode(out.tokens if args.only_new else prompt + out.tokens))
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        print(f"[{len(prompt)} prompt tokens in {out.prompt_seconds:.2f} s, {len(out.tokens)} new tokens at "
              f"{out.tokens_per_second:.1f} tokens/s; context: {rule.describe()}; model "
              f"{describe_provenance(opened.provenance)}]", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args), PROG)
