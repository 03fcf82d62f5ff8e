"""training/logging.py: the log line, metrics.jsonl and its truncation on resume."""

from __future__ import annotations

import json
import math
import os

import pytest

from megatron_ls.training.logging import TrainingLogger, truncate_metrics


# ---- logging --------------------------------------------------------------------------------
def test_logger_writes_metrics_and_truncates_on_resume(tmp_path, capsys):
    log = TrainingLogger(rank=0, train_iters=4, save_dir=str(tmp_path), tensorboard_dir=str(tmp_path / "tb"))
    for it in range(1, 5):
        log.log_train(it, 2.0 - 0.1 * it, 1e-3, 0.5, 1000, 0.1)
    log.log_eval(4, 1.5, 100, 0.2)
    log.close()
    line = capsys.readouterr().out.splitlines()[0]
    # Each field with its value: iteration, loss (nats), bpc, lr, grad norm, tokens/s (1000 tokens in 0.1 s), times.
    fields = dict(part.strip().rsplit(" ", 1) for part in line.split("|"))
    assert fields["iteration"] == "1/4" and fields["loss"] == "1.9000" and fields["bpc"] == f"{1.9 / math.log(2):.4f}"
    assert float(fields["lr"]) == 1e-3 and fields["grad norm"] == "0.500" and fields["tokens/s"] == "10,000"
    assert fields["elapsed"].count(":") == 2 and fields["ETA"].count(":") == 2
    recs = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["iteration"] for r in recs] == [1, 2, 3, 4, 4]
    assert {"iteration", "lm_loss", "bpc", "lr"} <= set(recs[0])
    assert recs[0]["lm_loss"] == pytest.approx(1.9) and recs[0]["lr"] == 1e-3
    assert recs[0]["bpc"] == pytest.approx(1.9 / math.log(2))
    assert recs[-1]["valid_bpc"] == pytest.approx(1.5 / math.log(2))
    truncate_metrics(str(tmp_path / "metrics.jsonl"), 2)
    assert [json.loads(x)["iteration"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2]
    # TensorBoard: Megatron's names, plus BPC, tokens/s and memory.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm-loss-training", "learning-rate", "grad-norm", "bpc", "tokens-per-second", "memory"} <= tags, tags
    assert [e.step for e in events.Scalars("lm-loss-training")] == [1, 2, 3, 4]
    assert events.Scalars("lm-loss-training")[0].value == pytest.approx(1.9)
    assert events.Scalars("learning-rate")[0].value == pytest.approx(1e-3)
    assert events.Scalars("bpc")[0].value == pytest.approx(1.9 / math.log(2))


def test_logger_is_silent_off_rank0(tmp_path, capsys):
    log = TrainingLogger(rank=1, train_iters=4, save_dir=str(tmp_path), tensorboard_dir=None)
    log.log_train(1, 1.0, 1e-3, 0.5, 1000, 0.1)
    assert capsys.readouterr().out == "" and not os.path.exists(tmp_path / "metrics.jsonl")
