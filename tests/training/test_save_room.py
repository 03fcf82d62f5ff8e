"""Room for a save (training/disk_space.py, run_folder.check_room) and a write failing on one rank mid-save."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist
from distributed import run_distributed
from fake_engine import FakeEngine, saved

from megatron_ls.checkpoint import files
from megatron_ls.checkpoint.manifest import tag_bytes
from megatron_ls.errors import CheckpointError
from megatron_ls.training import checkpointing as ckpt
from megatron_ls.training import run_folder


# ---- room for a save ------------------------------------------------------------------------------
def test_room_check_before_a_save(tmp_path, monkeypatch):
    d = str(tmp_path / "ck")
    saved(d, 5)
    size = tag_bytes(os.path.join(d, "iter_0000005"))
    assert size > 0
    assert run_folder.checkpoint_bytes(d, 10) == size and run_folder.checkpoint_bytes(d, 10 * size) == 10 * size
    monkeypatch.setenv("MEGATRON_LS_TEST_FREE_BYTES", str(size))  # less than size + 5%
    with pytest.raises(CheckpointError, match=r"no room for checkpoint iter_0000010 in .*: it needs about .*, "
                                              r".* are free; the run stops here and the last checkpoint "
                                              r"iter_0000005 is intact"):
        run_folder.check_room(d, 10, 0)
    monkeypatch.setenv("MEGATRON_LS_TEST_FREE_BYTES", str(2 * size))
    assert run_folder.check_room(d, 10, 0) == size


def _save_fails_on_rank1(rank: int, world: int, d: str) -> None:
    ckpt.save_checkpoint(FakeEngine(1), d, 1, {}, {"model": {}, "run": {}})
    with pytest.raises(CheckpointError) as e:
        ckpt.save_checkpoint(FakeEngine(2, fail_rank=1), d, 2, {}, {"model": {}, "run": {}}, expected_bytes=1 << 20)
    text = str(e.value)
    assert "saving checkpoint iter_0000002 into" in text and "no space left on device" in text, text
    assert "the previous checkpoint iter_0000001 and 'latest' are intact" in text, text
    dist.barrier()
    assert not os.path.exists(os.path.join(d, "iter_0000002.partial"))
    assert files.read_latest(d) == "iter_0000001"
    ckpt.save_checkpoint(FakeEngine(3), d, 3, {}, {"model": {}, "run": {}})  # the ranks are still in step


@pytest.mark.timeout(120)
def test_a_write_failing_on_one_rank_fails_the_save_on_every_rank(tmp_path):
    run_distributed(_save_fails_on_rank1, 2, str(tmp_path / "ck"), timeout=100)
