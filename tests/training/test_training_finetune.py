"""--finetune across layouts: weights saved by a ZeRO-3 run (or converted to a consolidated folder) start runs
with another TP / PP / ZeRO layout, and the first loss, computed before any update, equals the one-process run's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from training_utils import ROOT, TINY, env, error_lines, make_shards, run, spawn_ranks, train_losses, wait_all

pytestmark = pytest.mark.slow
NO_DROPOUT = [a if a != "0.1" else "0.0" for a in TINY]  # TP ranks draw dropout masks from their own streams
ONE_STEP = ["--train-iters", "1", "--eval-iters", "0", "--finetune"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_shards(str(tmp_path_factory.mktemp("data") / "pydoc"))


@pytest.fixture(scope="module")
def sources(data, tmp_path_factory) -> dict[str, str]:
    """A ZeRO-3 training checkpoint after 3 steps, and the consolidated folder converted from it."""
    root = tmp_path_factory.mktemp("sources")
    zero3, consolidated = str(root / "zero3"), str(root / "consolidated")
    r = run(["--data-path", data, *NO_DROPOUT, "--train-iters", "3", "--eval-iters", "0", "--zero-stage", "3",
             "--save", zero3])
    assert r.returncode == 0, r.stderr[-3000:]
    c = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "--load", zero3,
                        "--output", consolidated], env=env(), capture_output=True, text=True, timeout=120)
    assert c.returncode == 0, c.stderr[-3000:]
    return {"zero3": zero3, "consolidated": consolidated}


def _first_loss(save: str) -> float:
    return train_losses(save)[0][1]


@pytest.fixture(scope="module")
def reference(data, sources, tmp_path_factory) -> float:
    """One process, ZeRO 0, from the ZeRO-3 checkpoint."""
    save = str(tmp_path_factory.mktemp("reference"))
    r = run(["--data-path", data, *NO_DROPOUT, *ONE_STEP, "--load", sources["zero3"], "--save", save])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded the weights of" in r.stdout
    return _first_loss(save)


@pytest.mark.timeout(300)
def test_weights_are_the_trained_ones(data, reference, tmp_path):
    scratch = str(tmp_path / "scratch")
    r = run(["--data-path", data, *NO_DROPOUT, "--train-iters", "1", "--eval-iters", "0", "--save", scratch])
    assert r.returncode == 0, r.stderr[-3000:]
    assert reference < _first_loss(scratch) - 0.05  # 3 trained steps are visible in the loss


@pytest.mark.timeout(300)
def test_zero3_from_consolidated(data, sources, reference, tmp_path):
    save = str(tmp_path / "ft")
    r = run(["--data-path", data, *NO_DROPOUT, *ONE_STEP, "--load", sources["consolidated"], "--zero-stage", "3",
             "--save", save])
    assert r.returncode == 0, r.stderr[-3000:]
    assert _first_loss(save) == pytest.approx(reference, rel=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout,source", [(["--tensor-model-parallel-size", "2", "--zero-stage", "1"], "zero3"),
                                           (["--pipeline-model-parallel-size", "2"], "consolidated")])
def test_other_layout_two_ranks(data, sources, reference, tmp_path, layout, source):
    save = str(tmp_path / "ft")
    results = wait_all(spawn_ranks(["--data-path", data, *NO_DROPOUT, *ONE_STEP, "--load", sources[source],
                                    *layout, "--save", save], world=2), timeout=240)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    assert _first_loss(save) == pytest.approx(reference, rel=1e-5)


@pytest.mark.timeout(300)
def test_other_architecture_is_one_clear_error(data, sources, tmp_path):
    wide = list(NO_DROPOUT)
    wide[wide.index("--hidden-size") + 1] = "64"
    results = wait_all(spawn_ranks(["--data-path", data, *wide, *ONE_STEP, "--load", sources["consolidated"]],
                                   world=2), timeout=180)
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 1 and "Traceback" not in err, (rank, err[-3000:])
        (line,) = error_lines(err)
        assert "has hidden_size = 32, this run has 64" in line, line


@pytest.mark.timeout(300)
def test_finetune_from_an_empty_save_folder_is_an_error(data, tmp_path):
    """--load = --save with nothing there starts a resumable run from scratch, but not with --finetune."""
    folder = str(tmp_path / "empty")
    os.makedirs(folder)
    r = run(["--data-path", data, *NO_DROPOUT, *ONE_STEP, "--load", folder, "--save", folder])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    (line,) = error_lines(r.stderr)
    assert "no checkpoint there" in line, line


def test_other_tokenizer_is_refused(sources):
    """Same vocabulary size, other tokenizer: the ids would mean other symbols."""
    from megatron_ls.checkpoint.consolidated import read_config
    from megatron_ls.errors import CheckpointError
    from megatron_ls.training.finetune import read_source

    folder = sources["consolidated"]
    config = read_config(folder)
    assert read_source(folder, config, {}, {"type": "byte", "vocab_size": 256}).weights is not None
    with pytest.raises(CheckpointError, match="its tokenizer is not this data's"):
        read_source(folder, config, {}, {"type": "sentencepiece", "vocab_size": 256, "model_sha256": "0" * 64})
