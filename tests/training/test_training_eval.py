"""Evaluation during training scores every token of the valid lanes: a lane's short tail is padded, not dropped."""

from __future__ import annotations

import os

import pytest
import torch
from distributed import run_distributed
from training_utils import TINY, make_shards, metrics, run

SEQ, CHUNK, TAIL = 16, 8, 13  # the tail is not a multiple of the chunk


def _config():
    from megatron_ls.model.config import TransformerLSConfig

    return TransformerLSConfig(vocab_size=32, num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                               window_size=16, chunk_size=CHUNK, mem_length=16, dropout=0.0, seq_length=SEQ)


def _eval_tail(rank: int, world: int, pp: int, out: str) -> None:
    from megatron_ls.training.distributed import init_distributed
    from megatron_ls.training.engine import build_engine

    cfg = _config()
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine = build_engine(cfg, ds, init_distributed(1, pp, cfg), seed=1)
    tokens = torch.randint(0, 32, (2, 2 * SEQ + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    engine.reset_memory("eval")
    full = engine.eval_step(x[:, :SEQ], y[:, :SEQ])
    tail = engine.eval_step(x[:, SEQ:SEQ + TAIL], y[:, SEQ:SEQ + TAIL])  # padded to 16 tokens, 13 scored
    if rank == world - 1:
        torch.save({"full": full, "tail": tail}, os.path.join(out, f"pp{pp}.pt"))
    if pp > 1:
        return
    # The oracle: the model itself on whole chunks (it is causal, so what follows position 13 changes nothing).
    model = engine.module.eval()
    with torch.no_grad():
        nats0, memory = model(x[:, :SEQ], labels=y[:, :SEQ])
        nats1, _ = model(x[:, SEQ:2 * SEQ], memory, labels=y[:, SEQ:2 * SEQ])
    assert full[1] == 2 * SEQ and tail[1] == 2 * TAIL
    assert abs(full[0] - float(nats0.double().sum())) < 1e-6 * abs(full[0])
    assert abs(tail[0] - float(nats1[:, :TAIL].double().sum())) < 1e-6 * abs(tail[0])
    # The tail ends the stream: the next segment starts with an empty evaluation memory.
    again = engine.eval_step(x[:, :SEQ], y[:, :SEQ])
    assert again == full


@pytest.mark.timeout(240)
def test_eval_step_scores_a_short_tail(tmp_path):
    run_distributed(_eval_tail, 1, 1, str(tmp_path), timeout=200)
    run_distributed(_eval_tail, 2, 2, str(tmp_path), timeout=200)
    one, two = torch.load(tmp_path / "pp1.pt"), torch.load(tmp_path / "pp2.pt")
    assert one["full"][1] == two["full"][1] and one["tail"][1] == two["tail"][1]
    for k in ("full", "tail"):
        assert abs(one[k][0] - two[k][0]) <= 1e-5 * abs(one[k][0]), k


@pytest.mark.timeout(300)
def test_whole_split_evaluation_scores_every_lane_token(tmp_path):
    data = make_shards(str(tmp_path / "data" / "pydoc"))
    save = str(tmp_path / "ck")
    r = run(["--data-path", data, *TINY, "--train-iters", "1", "--eval-iters", "-1", "--save", save])
    assert r.returncode == 0, r.stderr[-3000:]
    from megatron_ls.data import load_split

    valid, _ = load_split(data, "valid")
    lanes = 4  # TINY's --global-batch-size
    (final,) = [m for m in metrics(save) if m.get("final")]
    assert final["valid_tokens"] == lanes * (len(valid) // lanes - 1)
