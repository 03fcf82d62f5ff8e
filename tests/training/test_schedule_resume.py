"""training/schedule_resume.py: the learning-rate schedule of a resumed run."""

from __future__ import annotations

import pytest

from megatron_ls.training.schedule_resume import lr_at, resolve_schedule
from megatron_ls.training.schedules import scheduler_config


# ---- the schedule of a resumed run -----------------------------------------------------------------
def _schedule(total: int, lr: float = 5e-4) -> dict:
    return {"scheduler": scheduler_config("cosine", lr, 1e-5, 5, total), "lr": lr}


def test_lr_at_follows_the_run_numbering():
    s = _schedule(30)
    assert lr_at(s, 1) == pytest.approx(5e-4 / 5)  # update 1 of 5 warm-up updates
    assert lr_at(s, 30) == pytest.approx(1e-5) and lr_at(s, 31) == pytest.approx(1e-5)  # stays at the floor


def test_extended_cosine_run_keeps_the_checkpoints_schedule():
    info = {"schedule": _schedule(30), "iteration": 30}
    ds = {"scheduler": _schedule(60)["scheduler"], "optimizer": {"params": {"lr": 5e-4}}}
    kept, line = resolve_schedule(info, ds, override=False, iteration=30)
    assert kept == _schedule(30) and "keeping the checkpoint's learning-rate schedule" in line
    assert "--override-opt_param-scheduler" in line and "update 31 is 1e-05 by the checkpoint's" in line
    taken, line = resolve_schedule(info, ds, override=True, iteration=30)
    assert taken is None and "taking this run's learning-rate schedule" in line
    assert resolve_schedule({"schedule": _schedule(60)}, ds, override=False, iteration=30) == (None, "")


def test_schedule_of_an_older_checkpoint_is_rebuilt_from_its_flags():
    run = {"lr_decay_style": "cosine", "lr": 5e-4, "min_lr": 1e-5, "lr_warmup_iters": 5, "train_iters": 30}
    ds = {"scheduler": _schedule(60)["scheduler"], "optimizer": {"params": {"lr": 5e-4}}}
    kept, _ = resolve_schedule({"run": run}, ds, override=False, iteration=30)
    assert kept == _schedule(30)
    kept, _ = resolve_schedule({"run": dict(run, deepspeed_config="x.json")}, ds, override=False, iteration=30)
    assert kept is None  # the user's own JSON made it: not guessed
