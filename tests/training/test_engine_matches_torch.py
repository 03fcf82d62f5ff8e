"""The training engine (DeepSpeed, AdamW, warm-up + cosine schedule, our clipping, lane memory, --loss-weight) takes
the same steps as a plain PyTorch loop written from the paper's recipe: the parallel tests compare layouts with one
process of the engine; this compares that one process with code that has no engine at all."""

from __future__ import annotations

import math
import os

import pytest
import torch
from distributed import run_distributed

STEPS, LANES, SEQ = 6, 4, 16


def _compare(rank: int, world: int, out: str) -> None:
    from megatron_ls.model import TransformerLSConfig
    from megatron_ls.model.lm import TransformerLSLM
    from megatron_ls.training.distributed import init_distributed, layout_for
    from megatron_ls.training.engine import build_engine

    cfg = TransformerLSConfig(vocab_size=27, num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                              window_size=8, chunk_size=4, mem_length=16, dropout=0.0, seq_length=SEQ)
    lr, warmup = 3e-3, 2
    ds = {"train_batch_size": LANES, "train_micro_batch_size_per_gpu": LANES, "gradient_accumulation_steps": 1,
          "gradient_clipping": 0.5, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
          "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                     "weight_decay": 0.1, "torch_adam": True}},
          "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_min_ratio": 0.0, "cos_min_ratio": 0.1,
                                                             "warmup_num_steps": warmup, "total_num_steps": STEPS,
                                                             "warmup_type": "linear"}}}
    engine = build_engine(cfg, ds, init_distributed(layout=layout_for(1, 1, 1, cfg)), seed=3)
    weights = (torch.arange(27) % 4).float()  # 0..3: some targets count not at all
    engine.set_loss_weights(weights)
    plain = TransformerLSLM(cfg)
    plain.load_state_dict(engine.module.state_dict())
    matrices = [p for p in plain.parameters() if p.dim() >= 2]  # Megatron's rule: no decay on biases and norms
    others = [p for p in plain.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices}, {"params": others, "weight_decay": 0.0}], lr=lr,
                            betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    data = torch.randint(0, 27, (LANES, STEPS * SEQ + 1), generator=torch.Generator().manual_seed(5))
    memory, results = None, []
    for step in range(1, STEPS + 1):
        x, y = data[:, (step - 1) * SEQ: step * SEQ], data[:, (step - 1) * SEQ + 1: step * SEQ + 1]
        engine_loss = engine.train_step(x, y)
        # DeepSpeed's WarmupCosineLR at iteration `step`, written out: linear warm-up from 0, then a cosine that
        # starts one step in and ends at 0.1 lr
        if step < warmup:
            rate = lr * step / warmup
        else:
            t = min(1.0, (step - warmup + 1) / (STEPS - warmup))
            rate = lr * (0.1 + 0.9 * (1 + math.cos(math.pi * t)) / 2)
        for group in opt.param_groups:
            group["lr"] = rate
        nats, memory = plain(x, memory, labels=y)  # the memory carries from segment to segment
        loss = (nats * weights[y]).mean()
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
        opt.step()
        results.append((engine_loss, loss.item(), engine.lr, rate, engine.grad_norm, norm.item()))
    plain_params = dict(plain.named_parameters())
    params = {n: (p.detach().clone(), plain_params[n].detach().clone()) for n, p in engine.module.named_parameters()}
    torch.save({"steps": results, "params": params}, os.path.join(out, "result.pt"))


@pytest.mark.timeout(120)
def test_engine_steps_equal_a_plain_torch_loop(tmp_path):
    run_distributed(_compare, 1, str(tmp_path), timeout=100)
    got = torch.load(tmp_path / "result.pt", weights_only=False)
    for engine_loss, loss, engine_lr, rate, engine_norm, norm in got["steps"]:
        assert engine_loss == pytest.approx(loss, rel=1e-5)
        assert engine_lr == pytest.approx(rate, rel=1e-6)
        assert engine_norm == pytest.approx(norm, rel=1e-4)
    assert got["steps"][0][4] > 0.5  # clipping is active
    for name, (a, b) in got["params"].items():
        if name.endswith("dproj.bias"):  # its exact gradient is 0 (a softmax over chunk positions cancels it): Adam
            continue  # turns the rounding noise left there into full-size steps in either loop
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
