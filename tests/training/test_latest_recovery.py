"""`latest` deleted or damaged (training/checkpointing.find_tag), another run's files in --save (run_folder.py)."""

from __future__ import annotations

import os

import pytest
from fake_engine import saved

from megatron_ls.checkpoint import files
from megatron_ls.errors import CheckpointError, ConfigError
from megatron_ls.training import checkpointing as ckpt
from megatron_ls.training import run_folder


# ---- `latest` deleted or damaged --------------------------------------------------------------
def test_deleted_latest_reads_the_newest_complete_checkpoint(tmp_path, capsys):
    d = str(tmp_path / "ck")
    saved(d, 5, 10)
    os.makedirs(os.path.join(d, "iter_0000015.partial"))  # never a candidate
    os.remove(os.path.join(d, "latest"))
    assert files.has_checkpoint(d)
    path, info = ckpt.locate_checkpoint(d)
    assert path.endswith("iter_0000010") and info["iteration"] == 10
    assert "no 'latest' file" in capsys.readouterr().out


def test_damaged_latest_is_one_clear_error(tmp_path):
    d = str(tmp_path / "ck")
    saved(d, 5)
    with open(os.path.join(d, "latest"), "wb") as f:
        f.write(bytes(range(128, 192)))  # not UTF-8: was a UnicodeDecodeError traceback
    with pytest.raises(CheckpointError, match=r"latest is damaged \(not text\): delete it .* iter_0000005"):
        ckpt.locate_checkpoint(d)
    assert files.read_latest(d) is None


@pytest.mark.parametrize("content,found", [
    ("latest", "a checkpoint (iter_0000005)"),
    ("tags", "1 complete checkpoint (newest iter_0000005, no 'latest')"),
    ("metrics", "another run's metrics.jsonl (no checkpoint)"),
    ("partial-only", None),
])
def test_previous_run_sees_every_kind_of_file(tmp_path, content, found):
    d = str(tmp_path / "ck")
    if content in ("latest", "tags"):
        saved(d, 5)
        if content == "tags":
            os.remove(os.path.join(d, "latest"))
    else:
        os.makedirs(os.path.join(d, "iter_0000005.partial"))
        if content == "metrics":
            with open(os.path.join(d, "metrics.jsonl"), "w") as f:
                f.write('{"iteration": 1}\n')
    assert run_folder.previous_run(d) == found
    if found:
        with pytest.raises(ConfigError, match=f"--save {d} already holds .* that this run would overwrite"):
            run_folder.check_no_previous_run(d, continuing=False)
    run_folder.check_no_previous_run(d, continuing=True)  # --load of the same folder continues it
