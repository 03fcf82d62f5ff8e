"""Preprocess a corpus into Megatron indexed shards: P_train / P_valid / P_test (.bin + .idx) + P.json.

    python tools/preprocess_data.py --dataset enwik8 --input enwik8.zip --output-prefix data/enwik8/enwik8
    python tools/preprocess_data.py --dataset text8 --download --output-prefix data/text8/text8
    python tools/preprocess_data.py --dataset text --input a.txt b.txt --output-prefix data/my/my \\
        --tokenizer sentencepiece --vocab-size 8000 --split 98,1,1
    python tools/preprocess_data.py --dataset default        # embedded corpus, no --input

Bad input ends with one line on stderr and exit status 1 (2 for bad arguments); nothing partial is
left behind. So does Ctrl-C (130) or SIGTERM (143); one during the final renames waits for them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from megatron_ls.cli.runner import run_cli
from megatron_ls.data.corpora import CORPORA, SPLIT_NAMES, download
from megatron_ls.data.preprocess import (
    PreprocessResult,
    preprocess_corpus,
    preprocess_default,
    preprocess_text,
)
from megatron_ls.data.shards import meta_path, split_prefix

PROG = "preprocess_data"
DEFAULT_PREFIX = os.path.join("data", "default", "pydoc")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split wants three numbers like 90,5,5, got {text!r}") from None
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or not 0 < sum(parts) < math.inf:
        raise argparse.ArgumentTypeError(f"--split wants three finite non-negative numbers, not all 0, like 90,5,5; "
                                         f"got {text!r}")
    return parts


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["enwik8", "text8", "text", "default"], required=True,
                   help="enwik8/text8: the standard 90M/5M/5M split; text: any files; default: embedded corpus")
    p.add_argument("--input", nargs="+", metavar="FILE",
                   help="enwik8/text8: the .zip or the raw file; text: one or more text files (in order)")
    p.add_argument("--output-prefix", metavar="P",
                   help=f"writes P_train, P_valid, P_test (.bin/.idx) and P.json (default for --dataset "
                        f"default: {DEFAULT_PREFIX})")
    p.add_argument("--tokenizer", choices=["byte", "sentencepiece"], default="byte",
                   help="--dataset text only (enwik8 is bytes, text8 its 27 symbols)")
    p.add_argument("--sentencepiece-model", metavar="M", help="an existing sentencepiece .model")
    p.add_argument("--vocab-size", type=int, metavar="V",
                   help="train a sentencepiece model of V pieces on the inputs (saved as P.model)")
    p.add_argument("--split", type=_split, metavar="A,B,C",
                   help="--dataset text: train/valid/test weights, contiguous in file order (default 90,5,5)")
    p.add_argument("--download", action="store_true",
                   help="enwik8/text8: fetch the canonical zip (to --input, or beside the output) and check it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output prefix")
    p.add_argument("--workers", type=int, default=1, help="sentencepiece encoding/training threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.dataset in CORPORA:
        if args.input and len(args.input) > 1:
            parser.error(f"--dataset {args.dataset} takes one --input")
        if not args.input and not args.download:
            parser.error(f"--dataset {args.dataset} needs --input {args.dataset}.zip (or --download)")
        if args.split is not None:
            parser.error(f"the {args.dataset} split is fixed (90M/5M/5M); --split is for --dataset text")
        if args.tokenizer != "byte" or args.sentencepiece_model or args.vocab_size:
            parser.error(f"--dataset {args.dataset} has its own tokenizer; --tokenizer is for --dataset text")
    elif args.download:
        parser.error("--download is for --dataset enwik8 or text8")
    if args.dataset == "text" and not args.input:
        parser.error("--dataset text needs --input FILE ...")
    if args.dataset == "default" and args.input:
        parser.error("--dataset default builds its own corpus; drop --input")
    if args.dataset != "default" and not args.output_prefix:
        parser.error("--output-prefix is required")
    if args.output_prefix and (args.output_prefix.endswith(os.sep) or os.path.isdir(args.output_prefix)):
        parser.error(f"--output-prefix {args.output_prefix} is a directory; give a file prefix like DIR/name")
    if args.tokenizer == "byte" and (args.sentencepiece_model or args.vocab_size):
        parser.error("--sentencepiece-model/--vocab-size need --tokenizer sentencepiece")
    if args.workers < 1:
        parser.error("--workers must be >= 1")


def _download_path(args: argparse.Namespace) -> str:
    return args.input[0] if args.input else os.path.join(
        os.path.dirname(os.path.abspath(args.output_prefix)), f"{CORPORA[args.dataset].name}.zip")


def _new_folders(args: argparse.Namespace) -> list[str]:
    """The folders this run would create (those on the way to its outputs that do not exist yet), deepest first."""
    paths = [args.output_prefix or DEFAULT_PREFIX] + ([_download_path(args)] if args.download else [])
    out: list[str] = []
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(folder) and folder not in out:
            out.append(folder)
            folder = os.path.dirname(folder)
    return sorted(out, key=lambda f: -f.count(os.sep))


def _remove_empty(folders: list[str]) -> None:
    for folder in folders:  # deepest first; rmdir removes only an empty folder: nothing else can be lost
        try:
            os.rmdir(folder)
        except OSError:
            pass


def run(args: argparse.Namespace) -> PreprocessResult:
    progress = not args.no_progress
    if args.dataset == "default":
        return preprocess_default(args.output_prefix or DEFAULT_PREFIX, args.overwrite, progress)
    if args.dataset in CORPORA:
        spec = CORPORA[args.dataset]
        path = _download_path(args)
        if args.download:
            if os.path.exists(path):
                print(f"{PROG}: {path} exists, not downloading it again", file=sys.stderr)
            else:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                download(spec, path, progress=progress)
        return preprocess_corpus(spec, path, args.output_prefix, args.overwrite, progress)
    return preprocess_text(args.input, args.output_prefix, args.tokenizer, args.sentencepiece_model,
                           args.vocab_size, args.split or (90, 5, 5), args.overwrite, args.workers, progress)


def format_stats(result: PreprocessResult) -> str:
    meta = result.meta
    prefix = result.prefix
    tok = meta["tokenizer"]
    lines = [
        f"{meta['dataset']}: wrote {split_prefix(prefix, '{' + ','.join(SPLIT_NAMES) + '}')}.{{bin,idx}} "
        f"and {meta_path(prefix)}",
        f"  tokenizer {tok['type']}, vocab {meta['vocab_size']}, dtype {meta['dtype']}",
    ]
    for split in SPLIT_NAMES:
        lines.append(f"  {split:<6}{meta['splits'][split]['tokens']:>14,} tokens")
    mbps = result.input_bytes / 1e6 / max(result.seconds, 1e-9)
    lines.append(f"  input {result.input_bytes:,} bytes in {result.seconds:.2f} s ({mbps:.1f} MB/s)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(args, parser)
    new_folders = _new_folders(args)
    results: list[PreprocessResult] = []

    def body() -> None:
        done = False
        try:
            results.append(run(args))
            done = True
        finally:
            if not done:  # a failed run leaves no empty output folder of its own making behind
                _remove_empty(new_folders)

    status = run_cli(body, PROG, error_prefix=f"{PROG}: error: ", stop_note="; nothing was written")
    if status == 0:
        print(format_stats(results[0]))
    return status


if __name__ == "__main__":
    sys.exit(main())
