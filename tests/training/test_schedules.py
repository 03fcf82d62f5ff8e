"""training/schedules.py: DeepSpeed's scheduler classes built from our JSON."""

from __future__ import annotations

import pytest
import torch

from megatron_ls.training.schedules import scheduler_config, start_at_first_update


# ---- schedules: DeepSpeed's scheduler classes built from our JSON ------------------------------
def _lrs(style, lr, min_lr, warmup, total):
    from deepspeed.runtime import lr_schedules

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    spec = scheduler_config(style, lr, min_lr, warmup, total)
    sched = getattr(lr_schedules, spec["type"])(opt, **spec["params"])
    start_at_first_update(sched)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules():
    # Update k of W warm-up updates runs at lr * k / W: none at lr 0, full lr at update W.
    c = _lrs("constant", 1e-3, 0.0, 10, 30)
    assert c[:10] == pytest.approx([1e-3 * k / 10 for k in range(1, 11)]) and all(x == 1e-3 for x in c[10:])
    assert all(x == 1e-3 for x in _lrs("constant", 1e-3, 0.0, 0, 10))
    assert all(x == 1e-3 for x in _lrs("constant", 1e-3, 0.0, 1, 10))
    lin = _lrs("linear", 1e-3, 1e-4, 5, 50)
    assert lin[0] == pytest.approx(1e-4 + 9e-4 / 5) and lin[4] == pytest.approx(1e-3)
    assert lin[-1] == pytest.approx(1e-4) and lin[20] > lin[40]
    cos = _lrs("cosine", 1e-3, 1e-4, 5, 50)
    assert cos[0] == pytest.approx(2e-4) and max(cos) == pytest.approx(1e-3, rel=0.01)
    assert cos[-1] == pytest.approx(1e-4) and cos[20] > cos[40]
