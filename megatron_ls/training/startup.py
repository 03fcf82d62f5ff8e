"""Start-up of a training run: data and model config from the flags and the shards, output folders, and the
state to start from (fresh, --finetune or an exact resume)."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Any

from megatron_ls.checkpoint.files import has_checkpoint
from megatron_ls.data import DataError, LaneDataset, load_split
from megatron_ls.data.tokenizers import tokenizer_mismatch
from megatron_ls.errors import CheckpointError, ConfigError
from megatron_ls.parallel.layout import ParallelLayout

from . import checkpointing as ckpt
from .collectives import global_rank
from .finetune import FinetuneSource
from .logging import print_rank0
from .run_folder import check_no_previous_run
from .settings import RunSettings
from .sp_reshard import old_ranks, resharded_state, saved_layout
from .zero_reshard import load_universal, partitioned


@dataclass(frozen=True)
class RunData:
    """The shards a run reads, and what it learns from them."""

    train: Any  # token memory maps
    valid: Any  # None without evaluation
    meta: dict  # P.json
    tokenizer: dict | None  # its description (recorded in checkpoints, compared on resume)
    fingerprint: str  # of the train split (recorded in checkpoints, compared on resume)


def load_data(args: RunSettings) -> RunData:
    train_tokens, meta = load_split(args.data_path, "train")
    valid_tokens = None
    if args.eval_iters != 0:
        valid_tokens, _ = load_split(args.data_path, "valid")
    for split, tokens in (("train", train_tokens), ("valid", valid_tokens)):
        # One pass over the memory map (a fraction of a second for enwik8): an id past the vocabulary would
        # otherwise surface as an index error inside the embedding, mid-training.
        top = int(tokens.max()) if tokens is not None and len(tokens) else -1
        if top >= int(meta["vocab_size"]):
            raise DataError(f"{args.data_path}_{split} holds token id {top} but {args.data_path}.json "
                            f"says the vocabulary has {meta['vocab_size']} ids: the shards and their metadata do not "
                            "belong together")
    return RunData(train_tokens, valid_tokens, meta, meta.get("tokenizer"), data_fingerprint(train_tokens))


def model_config(args: RunSettings, meta: dict) -> Any:
    """The model's config: the flags' model with the shards' vocabulary."""
    from megatron_ls.model import TransformerLSConfig

    shard_vocab = int(meta["vocab_size"])
    model = dict(args.model)
    want = model.get("vocab_size")
    if want is not None and want != shard_vocab:
        source = "--vocab-size" if "vocab_size" in args.explicit else f"--preset {args.preset}"
        tok = meta.get("tokenizer", {}).get("type", "?")
        raise ConfigError(f"the shards {args.data_path}_* have a vocabulary of {shard_vocab} ({tok} tokenizer, "
                          f"{args.data_path}.json) but the model's is {want} ({source})")
    model["vocab_size"] = shard_vocab
    try:
        return TransformerLSConfig(**model, seq_length=args.seq_length)
    except ValueError as e:
        raise ConfigError(f"model configuration: {e}") from None


def lanes(tokens: Any, args: RunSettings, dp_rank: int, dp: int, split: str) -> LaneDataset:
    """Training drops each lane's tail shorter than a segment; evaluation reads every lane to its end (the last,
    shorter segment is padded to whole chunks by the engine and only its real targets are scored)."""
    try:
        return LaneDataset(tokens, args.global_batch_size, args.seq_length, dp_rank, dp, drop_last=split == "train")
    except ValueError as e:
        raise DataError(f"{args.data_path}_{split} is too short for --global-batch-size {args.global_batch_size} "
                        f"x --seq-length {args.seq_length}: {e}") from None


def _restore_local_state(path: str, info: dict[str, Any], layout: ParallelLayout, train_data: LaneDataset,
                         engine: Any) -> None:
    """This rank's lane position, memory cache and RNG states from a verified checkpoint (resharded from the old
    SP ranks' when it was saved with another --sequence-parallel-size)."""
    saved = saved_layout(info.get("layout", {}), int(info["world_size"]), layout.zero_stage)
    if saved.sp == layout.sp:
        local = ckpt.load_local_state(path)
    else:
        states = [ckpt.load_local_state(path, r) for r in old_ranks(saved, layout, global_rank())]
        try:
            local = resharded_state(states, saved.sp, layout.coordinates(global_rank()).sp_rank, layout.sp)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {path}: its memory cache cannot be resharded: {e}") from None
    try:
        train_data.load_state_dict(local["data"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: its lane position does not fit this data: {e}") from None
    try:
        engine.load_memory_state_dict(local["memory"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: its memory cache does not fit this run: {e}") from None
    ckpt.set_rng_state(local["rng"])


def data_fingerprint(tokens: Any) -> str:
    """CRC-32 of the first and last MiB of a split, with its length: a resume on other data of the same size
    (another corpus cut to the same length, a re-tokenised copy) would otherwise continue silently."""
    n = 1 << 20
    crc = zlib.crc32(bytes(tokens[:n]))
    crc = zlib.crc32(bytes(tokens[-n:]), crc)
    return f"{len(tokens)}:{crc:08x}"


def run_info_of(args: RunSettings, config: Any, data: RunData) -> dict[str, Any]:
    """What run_state.json records besides the iteration: the model, the settings, the layout, the data."""
    return {
        "model": config.to_dict(),
        "run": args.to_dict() | {"data_fingerprint": data.fingerprint},
        "layout": args.layout.to_dict(),
        "tokenizer": data.tokenizer,
    }


def continues_in_place(args: RunSettings) -> bool:
    """--load is --save (without --finetune): this run continues the one whose files the folder holds."""
    return bool(args.load and args.save and not args.finetune
                and os.path.realpath(args.load) == os.path.realpath(args.save))


def check_outputs(args: RunSettings) -> None:
    """Folders this run writes: creatable and writable now (not after the model is built), and --save not
    holding another run's checkpoints or metrics that this run would overwrite (checked again under the
    folder's lock, see run_folder.py)."""
    from megatron_ls.output_check import check_writable

    for flag, path in (("--save", args.save), ("--tensorboard-dir", args.tensorboard_dir)):
        if path:
            check_writable(path, flag, folder=True)
    if args.save:
        check_no_previous_run(args.save, continues_in_place(args))


def should_resume(args: RunSettings) -> bool:
    """--load with --save pointing to the same place and no checkpoint yet is a fresh start of a resumable run."""
    if not args.load:
        return False
    if continues_in_place(args) and not has_checkpoint(args.load):
        print_rank0(f"no checkpoint in {args.load} yet: starting from scratch")
        return False
    return True


def start_state(args: RunSettings, data: RunData, config: Any, run: dict[str, Any], located: tuple[str, dict] | None,
                source: FinetuneSource | None, engine: Any, train_data: LaneDataset) -> int:
    """Collective. The iteration to start from: 0 for a fresh run or a --finetune (whose weights the engine was
    built with, or DeepSpeed reads now for another tool's checkpoint); on a resume (``located``: the verified
    checkpoint's path and run_state.json) the checkpoint's, with the engine's state, the lane position, the
    memory and the RNG restored."""
    iteration = 0
    if source is not None:
        if source.weights is None:  # another tool's DeepSpeed checkpoint: DeepSpeed reads its module weights
            ckpt.load_engine_state(engine, source.path, finetune=True)
        print_rank0(f"loaded the weights of {source.path} (--finetune: fresh optimizer, schedule, data and memory)")
    elif located is not None:
        path, info = located
        ckpt.check_compatible(info, config.to_dict(), run, False, path)
        differ = tokenizer_mismatch(info.get("tokenizer"), data.tokenizer)
        if differ:
            raise CheckpointError(f"checkpoint {path} was trained on another tokenizer than "
                                       f"{args.data_path}'s ({differ})")
        saved = (info.get("run") or {}).get("data_fingerprint")
        if saved and saved != data.fingerprint:
            raise CheckpointError(f"checkpoint {path} was trained on other data than {args.data_path}_train "
                                       f"(fingerprint {saved}, this split's {data.fingerprint}): an exact resume "
                                       "needs the same data; use --finetune to start a new phase on this data")
        if int(info["iteration"]) > args.train_iters:
            raise ConfigError(f"checkpoint {path} is at iteration {info['iteration']}, beyond --train-iters "
                              f"{args.train_iters}: raise --train-iters to train on (or --finetune to start a new "
                              "phase from its weights)")
        if (info.get("layout") or {}).get("sequence_parallel_size", 1) != args.layout.sp and partitioned(args):
            load_universal(engine, path)  # the optimizer's partitions recut for the new DP x SP group
        else:
            ckpt.load_engine_state(engine, path, finetune=False)
        if args.override_opt_param_scheduler:
            engine.refresh_lr()  # the next update runs at this run's schedule, not the checkpoint's
        ckpt.agree_on_checkpoint(lambda: _restore_local_state(path, info, args.layout, train_data, engine),
                                 "restoring the run state")
        iteration = int(info["iteration"])
        print_rank0(f"resumed from {path} at iteration {iteration}")
    return iteration
