"""cli/pretrain.py main(): what reaches the user when set-up is cut short."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.repo_paths import REPO_ROOT


# ---- main(): what reaches the user when set-up is cut short ----------------------------------
def test_main_sigterm_during_setup_and_lost_peer(monkeypatch, capsys):
    from megatron_ls.cli import pretrain

    monkeypatch.setattr(pretrain, "train", lambda argv: os.kill(os.getpid(), signal.SIGTERM) or 0)
    assert pretrain.main([]) == 143
    assert "terminated (SIGTERM) outside the training loop" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored

    def lost(argv):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:40579: Connection reset by "
                           "peer. This is typically caused by a remote worker hanging\nmore")

    monkeypatch.setattr(pretrain, "train", lost)
    assert pretrain.main([]) == 1
    err = capsys.readouterr().err
    assert "another rank stopped or lost its connection" in err and "Traceback" not in err

    def bug(argv):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(pretrain, "train", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # a real bug keeps its traceback
        pretrain.main([])


def test_argument_and_data_errors_come_before_torch_dynamo_loads(tmp_path):
    """torch._dynamo adds about 2 s to a process's start; training loads it (torch.optim does), --help and the
    errors about flags and shards must not wait for it."""
    code = ("import sys\nfrom megatron_ls.cli import pretrain\n"
            "rc = pretrain.main(['--data-path', sys.argv[1], '--seq-length', '64', '--train-iters', '1'])\n"
            "print('torch._dynamo' in sys.modules, rc)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing")], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.stdout.split() == ["False", "1"], r.stdout + r.stderr[-2000:]
    assert "shard metadata not found" in r.stderr
