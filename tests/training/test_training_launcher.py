"""pretrain_char_lm.py with several processes: the quickstart through `deepspeed`, two nodes on loopback,
errors on every rank without a hang, SIGTERM reaching one rank of two."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from training_utils import (
    ROOT,
    SCRIPT,
    TINY,
    deepspeed,
    env,
    error_lines,
    free_port,
    make_shards,
    metrics,
    popen_deepspeed,
    spawn_ranks,
    train_losses,
    wait_all,
    wait_for_metrics,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_shards(str(tmp_path_factory.mktemp("data") / "pydoc"))


@pytest.mark.timeout(400)
def test_quickstart_loss_falls(data, tmp_path):
    """examples/quickstart.sh itself (2 processes through the deepspeed launcher), shortened."""
    out = str(tmp_path / "qs")
    e = env()
    e.update(QS_DATA=data, QS_OUT=out, QS_ITERS="60", QS_PORT=str(free_port()))
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "quickstart.sh")], env=e, capture_output=True,
                       text=True, timeout=360)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    losses = [loss for _, loss in train_losses(out)]
    assert len(losses) == 3 and losses[-1] < losses[0] - 1.0, losses  # 20-step means, from ~4.5 nats
    valid = [m for m in metrics(out) if "valid_bpc" in m]
    assert valid and valid[-1]["final"] and valid[-1]["valid_bpc"] < 6.0
    assert "quickstart: training loss" in r.stdout and "valid BPC" in r.stdout
    # It ends by consolidating, evaluating the test split and sampling from the model it trained.
    assert sorted(os.listdir(os.path.join(out, "consolidated"))) == ["config.json", "model.safetensors",
                                                                      "tokenizer.json"]
    test_bpc = json.load(open(os.path.join(out, "test_bpc.json")))
    assert 0 < test_bpc["bpc"] < 8 and test_bpc["tokens"] > 0
    assert "test bits per character" in r.stdout
    sample = r.stdout.split("test bits per character", 1)[1].split("\n", 1)[1]  # generate.py's text comes last
    assert sample.startswith("The ") and len(sample.encode("utf-8", "surrogateescape")) > 100, r.stdout[-1000:]


@pytest.mark.timeout(300)
def test_two_nodes_on_loopback(data, tmp_path):
    """Two `deepspeed` launchers, one process each, started without ssh as node 0 and node 1."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    save, port = str(tmp_path / "ck"), free_port()
    args = ["--data-path", data, *TINY, "--train-iters", "3", "--eval-iters", "1", "--save", save]
    procs = []
    for node in (0, 1):
        cmd = ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--num_nodes", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port)]
        procs.append(popen_deepspeed(cmd, args))
    results = wait_all(procs, timeout=240)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    assert "world 2 = TP 1 x PP 1 x DP 2" in results[0][1]
    assert [it for it, _ in train_losses(save)] == [1, 2, 3]
    assert open(os.path.join(save, "latest")).read().strip() == "iter_0000003"


@pytest.mark.timeout(300)
def test_torchrun_two_processes(data, tmp_path):
    """`torchrun --nproc_per_node 2 pretrain_char_lm.py ...`: torchrun's environment, one run of DP 2."""
    save = str(tmp_path / "ck")
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), SCRIPT,
           "--data-path", data, *TINY, "--train-iters", "3", "--eval-iters", "1", "--save", save]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world 2 = TP 1 x PP 1 x DP 2" in r.stdout
    assert [it for it, _ in train_losses(save)] == [1, 2, 3]
    assert any(m.get("final") for m in metrics(save))
    tag = open(os.path.join(save, "latest")).read().strip()
    assert tag == "iter_0000003"
    files = os.listdir(os.path.join(save, tag))
    assert "run_state_rank00000.pt" in files and "run_state_rank00001.pt" in files


@pytest.mark.timeout(400)
def test_selective_recompute_under_tensor_parallelism(data, tmp_path):
    """TP = 2 with attention dropout: the rebuilt scores draw the same masks from the TP rank's RNG stream."""
    losses = []
    for extra in ([], ["--recompute-granularity", "selective"]):
        save = str(tmp_path / f"ck{len(extra)}")
        args = ["--data-path", data, *TINY, "--train-iters", "3", "--eval-iters", "0", "--tensor-model-parallel-size",
                "2", "--attention-dropout", "0.1", "--save", save, *extra]
        results = wait_all(spawn_ranks(args, world=2), timeout=240)
        for rc, _, err in results:
            assert rc == 0, err[-3000:]
        losses.append(train_losses(save))
    assert losses[0] == losses[1]  # bitwise


@pytest.fixture(scope="module")
def two_rank_checkpoint(data, tmp_path_factory) -> str:
    save = str(tmp_path_factory.mktemp("ck2"))
    results = wait_all(spawn_ranks(["--data-path", data, *TINY, "--train-iters", "2", "--eval-iters", "0",
                                    "--save", save], world=2), timeout=180)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    return save


def _assert_every_rank_failed(results, want: str) -> None:
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 1, (rank, err[-3000:])
        assert "Traceback" not in err, (rank, err[-3000:])
        lines = error_lines(err)
        assert len(lines) == 1 and lines[0].startswith(f"[rank {rank}] ") and want in lines[0], (rank, err[-3000:])


@pytest.mark.timeout(300)
def test_corrupt_checkpoint_fails_on_every_rank(data, two_rank_checkpoint, tmp_path):
    ck = str(tmp_path / "ck")
    shutil.copytree(two_rank_checkpoint, ck)
    victim = os.path.join(ck, "iter_0000002", "run_state_rank00001.pt")  # only rank 1 would read it
    blob = bytearray(open(victim, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(blob))
    results = wait_all(spawn_ranks(["--data-path", data, *TINY, "--train-iters", "4", "--eval-iters", "0",
                                    "--load", ck], world=2), timeout=180)
    _assert_every_rank_failed(results, "is corrupt: run_state_rank00001.pt fails its CRC-32 check")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["vocab", "missing-ckpt"])
def test_bad_data_or_checkpoint_fails_on_every_rank(data, tmp_path, case):
    """Found after the process group exists (shard metadata, checkpoint folder): every rank says it and exits 1."""
    args = ["--data-path", data, *TINY, "--train-iters", "2", "--eval-iters", "0"]
    if case == "vocab":
        args, want = args + ["--vocab-size", "27"], "have a vocabulary of 256 (byte tokenizer"
    else:
        args, want = args + ["--load", str(tmp_path / "nothing")], "checkpoint directory not found"
    _assert_every_rank_failed(wait_all(spawn_ranks(args, world=2), timeout=120), want)


@pytest.mark.timeout(300)
def test_contradicting_deepspeed_json_fails_on_every_rank(data, tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    args = ["--data-path", data, *TINY, "--train-iters", "2", "--zero-stage", "1", "--deepspeed_config", str(cfg)]
    want = "--zero-stage 1 contradicts zero_optimization.stage = 2"
    _assert_every_rank_failed(wait_all(spawn_ranks(args, world=2), timeout=120), want)
    # The same through the launcher: it exits non-zero promptly.
    t0 = time.monotonic()
    r = deepspeed(["--num_gpus", "2", "--master_port", str(free_port())], args, timeout=120)
    assert r.returncode != 0 and time.monotonic() - t0 < 100
    assert want in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr


@pytest.mark.timeout(300)
def test_sigterm_on_one_rank_stops_both_after_saving(data, tmp_path):
    save = str(tmp_path / "ck")
    procs = spawn_ranks(["--data-path", data, *TINY, "--train-iters", "100000", "--eval-iters", "0",
                         "--save", save], world=2)
    try:
        wait_for_metrics(save, 2, procs)
        procs[1].send_signal(signal.SIGTERM)  # e.g. a scheduler pre-empting one node
        results = wait_all(procs, timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    tag = open(os.path.join(save, "latest")).read().strip()
    assert f"after saving {tag}" in results[0][1]
    files = os.listdir(os.path.join(save, tag))
    assert "run_state_rank00000.pt" in files and "run_state_rank00001.pt" in files
