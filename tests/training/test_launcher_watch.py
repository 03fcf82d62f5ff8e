"""training/launcher_watch.py: which launcher started this process."""

from __future__ import annotations

import pytest

from megatron_ls.training.launcher_watch import launcher_kind


# ---- launchers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,kind", [
    (["/v/bin/python", "/v/bin/deepspeed", "--num_gpus", "2", "train.py"], "the deepspeed command"),
    (["/v/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"], "DeepSpeed's launch.py"),
    (["/v/bin/python", "/v/bin/torchrun", "--nproc_per_node", "2"], "torchrun"),
    (["/v/bin/python", "-m", "torch.distributed.run", "x.py"], "torchrun"),
    (["/bin/bash", "run.sh"], None),
    (["/v/bin/python", "pretrain_char_lm.py", "--data-path", "deepspeed"], None),
])
def test_launcher_kind(argv, kind):
    assert launcher_kind(argv) == kind
