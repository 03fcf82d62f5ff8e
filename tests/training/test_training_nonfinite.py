"""A step whose gradients are not finite is skipped: no parameter, optimizer or schedule change; training goes on."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed
from training_utils import TINY, make_shards


def _skip_one_step(rank: int, world: int, bf16: bool) -> None:
    from megatron_ls.model.config import TransformerLSConfig
    from megatron_ls.training.arguments import finalize_args, parse_args
    from megatron_ls.training.distributed import init_distributed
    from megatron_ls.training.ds_config import build_ds_config
    from megatron_ls.training.engine import build_engine

    args = finalize_args(parse_args(["--data-path", "unused", "--seq-length", "16", "--train-iters", "10",
                                     "--global-batch-size", "2", "--lr", "1e-2", "--lr-warmup-iters", "0"]
                                    + (["--bf16"] if bf16 else [])), world_size=1)
    cfg = TransformerLSConfig(vocab_size=32, num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                              window_size=16, chunk_size=8, mem_length=16, dropout=0.0, seq_length=16)
    ds = build_ds_config(args, on_cpu=True)
    engine = build_engine(cfg, ds, init_distributed(1, 1, cfg), seed=1)
    poison = {"on": False}

    def hook() -> None:
        if poison["on"]:
            next(p for p in engine.module.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")

    engine.add_pre_step_hook(hook)
    tokens = torch.randint(0, 32, (2, 3 * 16 + 1), generator=torch.Generator().manual_seed(0))

    def batch(i: int):
        return tokens[:, i * 16:(i + 1) * 16], tokens[:, i * 16 + 1:(i + 1) * 16 + 1]

    def snapshot():
        return [p.detach().clone() for p in engine.module.parameters()]

    assert torch.isfinite(torch.tensor(engine.train_step(*batch(0))))
    sched = engine.engine.lr_scheduler
    before, sched_before, steps_before = snapshot(), sched.last_batch_iteration, engine.engine.skipped_steps
    poison["on"] = True
    engine.train_step(*batch(1))
    poison["on"] = False
    assert engine.engine.skipped_steps == steps_before + 1
    assert engine.update_skipped
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot())), "a non-finite step changed the weights"
    assert sched.last_batch_iteration == sched_before  # the schedule did not advance
    loss = engine.train_step(*batch(2))
    assert torch.isfinite(torch.tensor(loss)) and not engine.update_skipped
    assert any(not torch.equal(a, b) for a, b in zip(before, snapshot())), "training did not go on"
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())


@pytest.mark.timeout(240)
@pytest.mark.parametrize("bf16", [False, True])
def test_nonfinite_gradients_skip_the_update(bf16):
    run_distributed(_skip_one_step, 1, bf16, timeout=200)


def _nan_forward_resets_memory(rank: int, world: int, pp: int) -> None:
    """One step whose forward turns NaN: the update is skipped and the next step trains on finite memory."""
    from megatron_ls.model.config import TransformerLSConfig
    from megatron_ls.training.distributed import init_distributed
    from megatron_ls.training.engine import build_engine

    cfg = TransformerLSConfig(vocab_size=32, num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                              window_size=16, chunk_size=8, mem_length=16, dropout=0.0, seq_length=16)
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "gradient_clipping": 1.0}
    engine = build_engine(cfg, ds, init_distributed(1, pp, cfg), seed=1)
    poison = {"on": False}

    def nan_output(module, inputs, output):
        if not poison["on"]:
            return output
        if isinstance(output, tuple):  # a pipeline stage's layer: (hidden, lane set)
            return (output[0] * float("nan"), *output[1:])
        return output * float("nan")

    first_layer = engine.module.memory_layers()[0] if pp > 1 else engine.module.layers[0]
    first_layer.register_forward_hook(nan_output)
    tokens = torch.randint(0, 32, (2, 4 * 16 + 1), generator=torch.Generator().manual_seed(0))

    def batch(i: int):
        return tokens[:, i * 16:(i + 1) * 16], tokens[:, i * 16 + 1:(i + 1) * 16 + 1]

    assert torch.isfinite(torch.tensor(engine.train_step(*batch(0))))
    skipped = engine.engine.skipped_steps
    poison["on"] = True
    assert not torch.isfinite(torch.tensor(engine.train_step(*batch(1))))
    poison["on"] = False
    assert engine.engine.skipped_steps == skipped + 1
    # The NaN memory of that step is not carried on: the next steps are finite again.
    for i in (2, 3):
        loss = engine.train_step(*batch(i))
        assert torch.isfinite(torch.tensor(loss)), f"step {i}: loss {loss} after one NaN forward"
    memory = engine.memory_state_dict()["memory"]["train"]
    tensors = [m for mem in memory.values() for m in (mem.values() if isinstance(mem, dict) else mem)]
    assert tensors and all(torch.isfinite(m).all() for m in tensors)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("pp", [1, 2])
def test_nan_forward_does_not_poison_the_memory(pp):
    run_distributed(_nan_forward_resets_memory, pp, pp, timeout=200)


def _train_with_nan_gradients(rank: int, world: int, data: str, save: str) -> None:
    """pretrain_char_lm's loop with every gradient poisoned after the forward: the loss stays finite."""
    from megatron_ls.errors import TrainingError
    from megatron_ls.training import engine as engine_module
    from megatron_ls.training.loop import train

    build = engine_module.build_engine

    def poisoned_build(*args, **kwargs):
        engine = build(*args, **kwargs)

        def hook() -> None:
            next(p for p in engine.module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

        engine.add_pre_step_hook(hook)
        return engine

    engine_module.build_engine = poisoned_build
    with pytest.raises(TrainingError, match="for 3 steps in a row") as e:
        train(["--data-path", data, *TINY, "--train-iters", "20", "--max-nonfinite-steps", "3", "--eval-iters", "0",
               "--save", save])
    assert "every update was skipped" in str(e.value) and "iterations 1-3" in str(e.value)


@pytest.mark.timeout(240)
def test_skipped_updates_with_finite_loss_stop_the_run(tmp_path):
    """The loop counts the engine's skipped updates, not only non-finite losses."""
    data = make_shards(str(tmp_path / "data" / "pydoc"))
    save = str(tmp_path / "ck")
    run_distributed(_train_with_nan_gradients, 1, data, save, timeout=200)
    import json

    recs = [json.loads(line) for line in open(f"{save}/metrics.jsonl")]
    assert [r["skipped"] for r in recs] == [1, 1]  # logged each iteration (TINY: --log-interval 1)
    assert all(r["lm_loss"] is not None for r in recs)  # the losses were finite
