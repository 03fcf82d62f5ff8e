"""Checkpoints of a training run: DeepSpeed's save/load plus the run's own state, as one collective.

The files and their names are megatron_ls.checkpoint's (files.py, manifest.py). A save writes everything into
TAG.partial, then rank 0 writes the manifest, renames the folder to TAG and only then replaces `latest`. A crash
at any point leaves `latest` naming the previous complete checkpoint. Loading checks the manifest (sizes and
CRCs, shared out over the ranks) before DeepSpeed reads a byte, so a damaged checkpoint is one clear error on
every rank.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
from typing import Any

import numpy as np
import torch

from megatron_ls.checkpoint.files import (
    LATEST,
    MANIFEST,
    PARTIAL,
    RUN_INFO,
    TAG_RE,
    complete_tags,
    find_tag,
    fsync_tree,
    publish_tag,
    read_latest,
    run_state_file,
    tag_name,
    write_json,
    write_latest,
)
from megatron_ls.checkpoint.manifest import read_manifest, verify_files, write_manifest
from megatron_ls.errors import CheckpointError, UserError

from .collectives import agree, barrier, is_distributed
from .disk_space import human_bytes, statvfs_free
from .sp_reshard import check_sp_reshard

# Test hook only: SIGKILL this process in the middle of the save of that iteration.
CRASH_ENV = "MEGATRON_LS_TEST_CRASH_IN_SAVE"


def _rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


# ---- RNG ------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    from megatron_ls.parallel.random import get_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron_ls.parallel.random import get_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_rng_tracker().set_states(state["tracker"])


def _maybe_crash(iteration: int) -> None:
    if os.environ.get(CRASH_ENV) == str(iteration):
        os.kill(os.getpid(), signal.SIGKILL)


# ---- save -----------------------------------------------------------------------------------
def save_checkpoint(engine: Any, save_dir: str, iteration: int, local_state: dict[str, Any],
                    run_info: dict[str, Any], keep_last: int | None = None, expected_bytes: int = 0) -> str:
    """Collective: every rank calls it. Returns the path of the new checkpoint.

    A write that fails on any rank (a full disk) is one CheckpointError on every rank; the partial folder is
    removed and the previous checkpoint and `latest` stay as they were. ``expected_bytes`` (the size the
    save should have) goes into that message.
    """
    tag = tag_name(iteration)
    final, partial = os.path.join(save_dir, tag), os.path.join(save_dir, tag + PARTIAL)
    rank = _rank()
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        for name in os.listdir(save_dir):  # left by a save that a crash interrupted
            if name.endswith(PARTIAL) and TAG_RE.match(name[: -len(PARTIAL)]):
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    barrier()
    failure = ""
    try:
        # DeepSpeed must not write `latest` itself: it would name the partial folder.
        engine.save_checkpoint(save_dir, tag + PARTIAL, client_state={"iteration": iteration}, save_latest=False)
    except Exception as e:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError, OSError, ...
        failure = _write_failure(e, save_dir)
        # Its collectives come before the files are written; the one left is its closing barrier, where the
        # ranks that wrote their files now wait for this one.
        barrier()
    if not failure:
        try:
            os.makedirs(partial, exist_ok=True)
            torch.save(dict(local_state, rank=rank, world_size=_world(), iteration=iteration),
                       os.path.join(partial, run_state_file(rank)))
        except Exception as e:  # noqa: BLE001
            failure = _write_failure(e, save_dir)
    _maybe_crash(iteration)
    _agree_saved(failure, save_dir, partial, tag, expected_bytes)
    published = False
    if rank == 0:
        try:
            write_json(os.path.join(partial, RUN_INFO), dict(run_info, iteration=iteration, world_size=_world()))
            fsync_tree(partial)
            write_manifest(partial, iteration, tag, _world())
            publish_tag(partial, final)
            published = True
            write_latest(save_dir, tag)
        except Exception as e:  # noqa: BLE001
            failure = _write_failure(e, save_dir)
    _agree_saved(failure, save_dir, partial if not published else None, tag, expected_bytes)
    if rank == 0 and keep_last is not None:
        for _, old_tag in complete_tags(save_dir)[:-keep_last]:
            if old_tag != tag:
                shutil.rmtree(os.path.join(save_dir, old_tag), ignore_errors=True)
    barrier()
    return final


def _write_failure(e: BaseException, folder: str) -> str:
    """What went wrong with a write, in words: a full disk however torch reports it (OSError ENOSPC,
    RuntimeError 'unexpected pos' / 'file write failed', 'iostream error'), else the error's first line."""
    full = isinstance(e, OSError) and e.errno == errno.ENOSPC
    if not full:
        try:
            full = statvfs_free(folder) < (1 << 20)
        except OSError:
            pass
    return "no space left on device" if full else f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"


def _agree_saved(failure: str, save_dir: str, partial: str | None, tag: str, expected_bytes: int) -> None:
    """Collective: if a write failed on any rank, remove the partial folder and raise one message on every rank."""
    def check() -> None:
        if failure:
            raise CheckpointError(failure)

    try:
        agree(check, "saving the checkpoint")
    except UserError as e:
        reason = failure or str(e)
        if _rank() == 0 and partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        barrier()
        if "no space left on device" in reason:
            try:
                free = statvfs_free(save_dir)
            except OSError:
                free = 0
            need = f"needs about {human_bytes(expected_bytes)}, " if expected_bytes else ""
            reason = f"no space left on device (the checkpoint {need}{human_bytes(free)} are free)"
        previous = read_latest(save_dir)
        kept = f"the previous checkpoint {previous} and '{LATEST}' are intact" if previous else "no earlier checkpoint"
        raise CheckpointError(f"saving checkpoint {tag} into {save_dir} failed: {reason}; its partial folder was "
                              f"removed and {kept}") from None


# ---- load -----------------------------------------------------------------------------------
def _read_tag(load_dir: str) -> str:
    tag, note = find_tag(load_dir)
    if note and _rank() == 0:
        print(note, flush=True)
    return tag


def locate_checkpoint(load_dir: str, weights_only: bool = False) -> tuple[str, dict[str, Any]]:
    """Collective. Resolve `latest`, verify the checkpoint, return (path, run_state.json).

    With ``weights_only`` (--finetune) a plain DeepSpeed checkpoint without our manifest and run state
    (one written by another tool) is accepted as it is: only its module weights are read.
    """
    rank, world = _rank(), _world()

    def check() -> tuple[str, dict[str, Any]]:
        tag = _read_tag(load_dir)
        path = os.path.join(load_dir, tag)
        if weights_only and not os.path.exists(os.path.join(path, MANIFEST)):
            return path, {}
        manifest = read_manifest(path)
        verify_files(path, manifest["files"], rank, world)
        try:
            with open(os.path.join(path, RUN_INFO)) as f:
                info = json.load(f)
        except (OSError, json.JSONDecodeError):
            raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {RUN_INFO}") from None
        return path, info

    return agree_on_checkpoint(check, "checking the checkpoint")


def agree_on_checkpoint(fn: Any, what: str) -> Any:
    """Collective: ``agree`` for checkpoint work, so a failure on any rank is one CheckpointError on every rank."""
    try:
        return agree(fn, what)
    except CheckpointError:
        raise
    except UserError as e:
        raise CheckpointError(str(e)) from None


def load_local_state(path: str, rank: int | None = None) -> dict[str, Any]:
    """This rank's (or ``rank``'s) run_state file of a verified checkpoint."""
    f = os.path.join(path, run_state_file(_rank() if rank is None else rank))
    try:
        # Our own file (RNG states hold numpy arrays and tuples): not a weights-only pickle.
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {os.path.basename(f)} ({e})") from None


def load_engine_state(engine: Any, path: str, finetune: bool, universal: bool = False) -> None:
    """Collective. DeepSpeed's part: everything on resume, the module's weights only with --finetune;
    ``universal``: ``path`` is DeepSpeed's universal checkpoint (zero_reshard.py).

    Agreed across ranks: a rank whose load fails alone would leave the others waiting in the next collective.
    (A failure inside one of DeepSpeed's own collectives during the load cannot be caught here.)
    """
    load_dir, tag = os.path.dirname(path), os.path.basename(path)

    def load() -> None:
        try:
            result = engine.load_checkpoint(load_dir, tag, load_optimizer_states=not finetune,
                                            load_module_only=finetune, universal=universal)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - DeepSpeed raises many kinds; the message is what matters
            raise CheckpointError(f"DeepSpeed could not load {path}: {type(e).__name__}: {e}") from None
        if isinstance(result, tuple) and result and result[0] is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {path}")

    agree_on_checkpoint(load, "loading the checkpoint")


# Architecture fields that must match for any load; run fields that must match for a resume.
ARCH_FIELDS = ("vocab_size", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
               "attention_type", "window_size", "chunk_size", "chunk_rank")


def check_compatible(info: dict[str, Any], model: dict[str, Any], run: dict[str, Any], finetune: bool,
                     path: str) -> None:
    """Raise if the checkpoint cannot continue as this run (identical on every rank)."""
    saved_model = info.get("model", {})
    for k in ARCH_FIELDS:
        if k in saved_model and saved_model[k] != model.get(k):
            raise CheckpointError(f"checkpoint {path} has {k} = {saved_model[k]}, this run has {model.get(k)}")
    if finetune:
        return  # --finetune reads the weights into any layout (training/finetune.py)
    layout = info.get("layout", {})
    for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if layout.get(k, 1) != run.get(k, 1):
            raise CheckpointError(f"checkpoint {path} was saved with --{k.replace('_', '-')} {layout.get(k, 1)}, "
                                  f"this run has {run.get(k, 1)}: an exact resume needs the same layout; use "
                                  "--finetune to start a new phase from its weights")
    if bool(layout.get("sequence_parallel")) != bool(run.get("sequence_parallel")):
        raise CheckpointError(f"checkpoint {path} was saved with --sequence-parallel "
                              f"{_shown(bool(layout.get('sequence_parallel')))}, this run has "
                              f"{_shown(bool(run.get('sequence_parallel')))}: an exact resume needs the same; use "
                              "--finetune to start a new phase from its weights")
    saved_sp, sp = layout.get("sequence_parallel_size", 1), run.get("sequence_parallel_size", 1)
    if saved_sp != sp:
        check_sp_reshard(layout, run, path)  # the run state is resharded (sp_reshard.py)
    # Other processes than SP accounts for: another data-parallel degree, which changes the lanes.
    if info.get("world_size") // saved_sp != run["world_size"] // sp:
        raise CheckpointError(f"checkpoint {path} was saved by {info.get('world_size')} processes, this run has "
                              f"{run['world_size']}: resume with the same layout, or start a phase with --finetune")
    saved_run = info.get("run", {})
    # DeepSpeed's optimizer files differ by ZeRO stage and precision: loading across them fails deep inside it.
    for k, what in (("zero_stage", "--zero-stage"), ("bf16", "--bf16"), ("fp16", "--fp16")):
        theirs, mine = saved_run.get(k), run.get(k)
        if theirs is None or mine is None:
            continue
        if (theirs != mine) if k == "zero_stage" else (bool(theirs) != bool(mine)):
            raise CheckpointError(f"checkpoint {path} was saved with {what} {_shown(theirs)}, this run has "
                                  f"{_shown(mine)}: an exact resume needs the same (DeepSpeed's optimizer state "
                                  "differs); use --finetune to start a new phase from its weights")
    for k in ("seq_length", "global_batch_size", "mem_length"):
        mine = model.get(k) if k == "mem_length" else run.get(k)
        theirs = saved_model.get(k) if k == "mem_length" else saved_run.get(k)
        if theirs is not None and theirs != mine:
            raise CheckpointError(f"checkpoint {path} was trained with --{k.replace('_', '-')} {theirs}, this run "
                                  f"has {mine}: an exact resume needs the same; use --finetune to start a new phase")


def _shown(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)
