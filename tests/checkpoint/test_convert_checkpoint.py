"""Checkpoint conversion on real training checkpoints: TP=2 x PP=2 and TP=2 x DP=2 ZeRO-3 runs through the engine,
converted to the consolidated checkpoint (logits equal the original model's) and back to a TP=1 training layout that
the engine loads (logits equal again)."""

from __future__ import annotations

import os

import pytest
import torch
from distributed import run_distributed

from megatron_ls.model.config import TransformerLSConfig

SEQ, LANES = 16, 2
TOKENIZER = {"type": "text8", "vocab_size": 27, "alphabet": " abcdefghijklmnopqrstuvwxyz"}


def tiny_config() -> TransformerLSConfig:
    # vocab 27 is padded to 28 under TP=2: the padding rows must vanish in the consolidated weights.
    return TransformerLSConfig(vocab_size=27, num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                               window_size=16, chunk_size=8, mem_length=16, dropout=0.0, seq_length=SEQ,
                               attention_impl="blocked")


def stream() -> torch.Tensor:
    return torch.randint(0, 27, (LANES, 3 * SEQ + 1), generator=torch.Generator().manual_seed(3))


def _ds_config(zero: int, dp: int) -> dict:
    return {"train_batch_size": LANES, "train_micro_batch_size_per_gpu": LANES // dp,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": zero}, "steps_per_print": 10**9}


def _record_logits(engine, data: torch.Tensor, layout) -> torch.Tensor | None:
    """Logits (LANES, 2*SEQ, V) of the trained model over two evaluation segments (memory carried)."""
    from megatron_ls.parallel.mappings import gather_from_tensor_model_parallel_region

    vocab = engine.config.vocab_size
    seen: list[torch.Tensor] = []
    if engine.pipelined:
        module = engine.module
        loss_fn = module.loss_fn

        def recording(logits, targets):
            seen.append(gather_from_tensor_model_parallel_region(logits)[..., :vocab].detach().clone())
            return loss_fn(logits, targets)

        module.loss_fn = recording
        for step in range(2):
            seg = data[:, step * SEQ: (step + 1) * SEQ + 1]
            engine.eval_step(seg[:, :-1], seg[:, 1:])
        module.loss_fn = loss_fn
        if not layout.is_last_stage:
            return None
        k = len(seen) // 2  # micro-batches per evaluation step
        per_step = [torch.cat(seen[i * k:(i + 1) * k]) for i in range(2)]
        return torch.cat(per_step, dim=1)
    engine.engine.eval()
    per = LANES // layout.dp
    lanes = data[layout.dp_rank * per:(layout.dp_rank + 1) * per]
    memory = None
    with torch.no_grad():
        for step in range(2):
            logits, memory = engine.engine(lanes[:, step * SEQ:(step + 1) * SEQ], memory=memory)
            seen.append(logits)
    out = torch.cat(seen, dim=1)
    gathered = [torch.empty_like(out) for _ in range(layout.dp)]
    torch.distributed.all_gather(gathered, out, group=_dp_group())
    return torch.cat(gathered)


def _dp_group():
    from megatron_ls.parallel import mpu

    return mpu.get_data_parallel_group()


def train_and_save(rank: int, world: int, out: str, tp: int, pp: int, zero: int) -> None:
    from megatron_ls.training import checkpointing as ckpt
    from megatron_ls.training.distributed import init_distributed
    from megatron_ls.training.engine import build_engine

    config = tiny_config()
    layout = init_distributed(tp, pp, config)
    engine = build_engine(config, _ds_config(zero, layout.dp), layout, seed=5)
    data = stream()
    per = LANES // layout.dp
    rows = slice(layout.dp_rank * per, (layout.dp_rank + 1) * per)
    engine.train_step(data[rows, :SEQ], data[rows, 1:SEQ + 1])  # one real update: weights differ from the init
    run_info = {"model": config.to_dict(), "tokenizer": TOKENIZER, "run": {"seq_length": SEQ},
                "layout": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                           "data_parallel_size": layout.dp}}
    ckpt.save_checkpoint(engine, os.path.join(out, "ckpt"), 1, {"data": None}, run_info)
    logits = _record_logits(engine, data, layout)
    if logits is not None and layout.tp_rank == 0 and layout.dp_rank == 0:
        torch.save(logits, os.path.join(out, "logits.pt"))


def load_converted(rank: int, world: int, out: str) -> None:
    """The engine of a TP=1 run loads the converted layout as --finetune does; record its logits."""
    from megatron_ls.training.distributed import init_distributed
    from megatron_ls.training.engine import build_engine
    from megatron_ls.training.finetune import read_source

    config = tiny_config()
    layout = init_distributed(1, 1, config)
    source = read_source(os.path.join(out, "back"), config, {"world_size": 1})
    # Another seed: the weights must come from disk.
    engine = build_engine(config, _ds_config(0, 1), layout, seed=99, initial_weights=source.weights)
    torch.save(_record_logits(engine, stream(), layout), os.path.join(out, "logits_back.pt"))


def consolidated_logits(folder: str) -> torch.Tensor:
    from megatron_ls.checkpoint.consolidated import load_consolidated

    model, tokenizer = load_consolidated(folder)
    assert tokenizer is not None and tokenizer.vocab_size == 27
    data, memory, out = stream(), None, []
    with torch.no_grad():
        for step in range(2):
            logits, memory = model(data[:, step * SEQ:(step + 1) * SEQ], memory)
            out.append(logits)
    return torch.cat(out, dim=1)


@pytest.mark.slow
def test_tp2_pp2_to_consolidated_and_back_to_tp1(tmp_path):
    from megatron_ls.cli.convert_checkpoint import main

    out = str(tmp_path)
    run_distributed(train_and_save, 4, out, 2, 2, 1, timeout=240)
    original = torch.load(os.path.join(out, "logits.pt"))
    cons = os.path.join(out, "consolidated")
    assert main(["--load", os.path.join(out, "ckpt"), "--output", cons]) == 0
    assert sorted(os.listdir(cons)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (consolidated_logits(cons) - original).abs().max().item() < 1e-5
    assert main(["--load", cons, "--output", os.path.join(out, "back"), "--target-tp", "1", "--target-pp", "1"]) == 0
    run_distributed(load_converted, 1, out, timeout=120)
    back = torch.load(os.path.join(out, "logits_back.pt"))
    assert (back - original).abs().max().item() < 1e-5


@pytest.mark.slow
def test_zero3_tp2_dp2_to_consolidated(tmp_path, capsys):
    """ZeRO-3 module states are placeholders: the weights come from the optimizer partitions, per TP rank."""
    from megatron_ls.cli.convert_checkpoint import main
    from megatron_ls.inference.model_source import load_model

    out = str(tmp_path)
    run_distributed(train_and_save, 4, out, 2, 1, 3, timeout=240)
    cons = os.path.join(out, "consolidated")
    assert main(["--load", os.path.join(out, "ckpt"), "--output", cons]) == 0
    original = torch.load(os.path.join(out, "logits.pt"))
    assert (consolidated_logits(cons) - original).abs().max().item() < 1e-5
    capsys.readouterr()
    load_model(os.path.join(out, "ckpt"))  # what generate.py / evaluate.py do with a training checkpoint
    assert capsys.readouterr().out == "", "zero_to_fp32's progress reached stdout (generate.py's text)"
