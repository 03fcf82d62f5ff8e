"""The analytic memory estimate against what the code really keeps, and pretrain_char_lm.py's memory check.

- activations: the bytes autograd saves for the backward (distinct storages seen by saved_tensors_hooks, parameters
  and the memory cache excluded) of a whole LM forward, within ACT_TOLERANCE of the estimate;
- parameters exactly, per stage; parameters + optimizer states of a real DeepSpeed engine (ZeRO 0/1, fp32/bf16)
  within 1 % (the rest is DeepSpeed's small bookkeeping);
- on CUDA, the memory allocated by a forward against the estimate (skipped on CPU: no CUDA allocator to read);
- the paper's enwik8-30l phase 3 fits 32 GB per GPU on 8 GPUs;
- pretrain_char_lm.py refuses a layout that cannot fit, on every rank, and runs one that fits.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import training_utils as tu
from distributed import run_distributed

from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.model.lm import TransformerLSLM
from megatron_ls.model.long_short_attention import set_selective_recompute
from megatron_ls.model.positions import _TABLES
from megatron_ls.parallel.layout import ParallelLayout
from megatron_ls.training.memory_estimate import (
    GiB,
    TrainingLayout,
    estimate_memory,
    stage_parameters,
    state_bytes,
)

ACT_TOLERANCE = 0.10  # measured agreement is about 1 %; 10 % leaves room for torch versions


def _config(**kw) -> TransformerLSConfig:
    base = dict(vocab_size=256, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                window_size=64, chunk_size=8, chunk_rank=1, dropout=0.1, attention_impl="blocked")
    return TransformerLSConfig(**{**base, **kw})


def saved_activation_bytes(model: torch.nn.Module, tokens: torch.Tensor, memory, labels: torch.Tensor) -> int:
    """Distinct storages autograd keeps for the backward, parameters and memory tensors excluded."""
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {m.untyped_storage().data_ptr() for m in memory or []}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, memory, labels=labels)
    return sum(seen.values())


@pytest.mark.parametrize("attention_type,precision,N,M,rank,selective", [
    ("long-short", "fp32", 256, 256, 1, False),
    ("long-short", "fp32", 256, 0, 1, False),
    ("long-short", "bf16", 128, 256, 2, False),
    ("long-short", "fp32", 512, 128, 1, False),
    ("window", "fp32", 256, 256, 1, False),
    ("full", "fp32", 128, 128, 1, False),
    ("long-short", "fp32", 512, 512, 1, True),
    ("long-short", "bf16", 128, 256, 2, True),
    ("window", "fp32", 256, 256, 1, True),
])
def test_activations_match_saved_tensors(attention_type, precision, N, M, rank, selective):
    torch.manual_seed(0)
    cfg = _config(attention_type=attention_type, mem_length=M, chunk_rank=rank)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = TransformerLSLM(cfg).to(dtype).train()
    set_selective_recompute(model, selective)
    B = 2
    tokens, labels = torch.randint(0, 256, (B, N)), torch.randint(0, 256, (B, N))
    memory = [torch.randn(B, M, cfg.hidden_size, dtype=dtype) for _ in range(cfg.num_layers)] if M else None
    measured = saved_activation_bytes(model, tokens, memory, labels)
    est = estimate_memory(cfg, N, M, TrainingLayout(micro_batch_size=B, precision=precision, device="cpu",
                                                    recompute_attention=selective))
    assert abs(est.activations - measured) <= ACT_TOLERANCE * measured, (est.activations, measured, est.detail)


def test_activations_at_paper_width():
    """One layer slice of the paper's model (width 512, window 512, chunk 16) at N = M = 1024."""
    cfg = TransformerLSConfig.from_preset("enwik8-12l", num_layers=1, mem_length=1024, attention_impl="blocked")
    model = TransformerLSLM(cfg).train()
    tokens = torch.randint(0, 256, (1, 1024))
    memory = [torch.randn(1, 1024, 512)]
    measured = saved_activation_bytes(model, tokens, memory, tokens)
    est = estimate_memory(cfg, 1024, 1024, TrainingLayout(device="cpu"))
    assert abs(est.activations - measured) <= ACT_TOLERANCE * measured, (est.activations, measured)


@pytest.mark.parametrize("attention_type", ["long-short", "window", "full"])
@pytest.mark.parametrize("tie", [True, False])
def test_parameters_exact(attention_type, tie):
    cfg = TransformerLSConfig.from_preset("text8-12l", attention_type=attention_type, tie_embeddings=tie)
    assert stage_parameters(cfg, 1, 1) == [TransformerLSLM(cfg).num_parameters()]
    per_stage = stage_parameters(cfg, 1, 3)
    emb = cfg.padded_vocab_size(1) * cfg.hidden_size
    # Every layer on exactly one stage; the embedding on the first and (tied copy or output layer) the last.
    assert sum(per_stage) == TransformerLSLM(cfg).num_parameters() + (emb if tie else 0)


def test_checkpointing_zero_and_pipeline_lower_the_estimate():
    cfg = TransformerLSConfig.from_preset("enwik8-12l")
    base = TrainingLayout(parallel=ParallelLayout(8), precision="bf16", attention_impl="fused")

    def total(**kw) -> int:
        degrees = {k: kw.pop(k) for k in ("tp", "pp", "zero_stage") if k in kw}  # on 8 GPUs: dp follows
        kw.pop("dp", None)
        return estimate_memory(cfg, 4096, 4096, dataclasses.replace(base, parallel=ParallelLayout(8, **degrees),
                                                                    **kw)).total

    assert total(checkpoint_activations=True) < total()
    assert total(zero_stage=2, reduce_bucket_size=10**6) < total(zero_stage=1, reduce_bucket_size=10**6)
    states = [sum(state_bytes(10**8, TrainingLayout(parallel=ParallelLayout(8, zero_stage=z), precision="bf16")))
              for z in range(4)]
    assert states == sorted(states, reverse=True) and states[3] < states[0] / 5
    assert total(pp=2, dp=4) < total()
    assert total(micro_batch_size=2) > total()


def test_window_position_table_adds_its_two_tables_to_the_workspace(monkeypatch):
    """MEGATRON_LS_WINDOW_POS=table: the table and its gradient (B x H/tp x N x w each) live in a layer's backward."""
    import argparse

    from megatron_ls.errors import ConfigError
    from megatron_ls.training.memory_check import training_layout

    cfg = TransformerLSConfig.from_preset("enwik8-12l", attention_impl="fused")
    args = argparse.Namespace(bf16=True, fp16=False, micro_batch_size=2, gradient_accumulation_steps=1,
                              layout=ParallelLayout(2, tp=2), zero_stage=0, checkpoint_activations=False)
    monkeypatch.setenv("MEGATRON_LS_WINDOW_POS", "table")
    table = training_layout(args, cfg, {}, "cuda")
    monkeypatch.setenv("MEGATRON_LS_WINDOW_POS", "band")
    band = training_layout(args, cfg, {}, "cuda")
    assert (table.attention_impl, band.attention_impl) == ("fused-table", "fused")
    diff = estimate_memory(cfg, 8192, 0, table).total - estimate_memory(cfg, 8192, 0, band).total
    assert diff == 2 * 2 * (8 // 2) * 8192 * 512 * 2  # 2 tables x B x H/tp x N x w x bf16
    monkeypatch.setenv("MEGATRON_LS_WINDOW_POS", "skewed")
    with pytest.raises(ConfigError, match="MEGATRON_LS_WINDOW_POS must be one of band, table, got 'skewed'"):
        training_layout(args, cfg, {}, "cuda")


def test_enwik8_30l_phase3_fits_32gb_on_8_gpus():
    """The paper trains 30 layers at 8192 tokens with 8192 of memory on 8 V100 32GB."""
    cfg = TransformerLSConfig.from_preset("enwik8-30l", mem_length=8192)
    layout = TrainingLayout(micro_batch_size=1, parallel=ParallelLayout(8, zero_stage=1), checkpoint_activations=True,
                            precision="fp16", attention_impl="fused")
    est = estimate_memory(cfg, 8192, 8192, layout)
    assert est.total < 32e9 * 0.8, est.line()
    # Even the pure-PyTorch fallback fits with checkpointing; without it, in fp32 at micro-batch 2, it does not.
    assert estimate_memory(cfg, 8192, 8192, TrainingLayout(**{**layout.__dict__, "attention_impl": "blocked"})
                           ).total < 32e9 * 0.8
    no_ckpt = TrainingLayout(micro_batch_size=2, parallel=ParallelLayout(8), precision="fp32", attention_impl="blocked")
    assert estimate_memory(cfg, 8192, 8192, no_ckpt).total > 32e9


# ---- parameters + optimizer states of a real DeepSpeed engine ---------------------------------------------------
def _live_tensor_bytes() -> int:
    import gc

    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.device.type == "cpu":
                storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        except Exception:  # objects that only look like tensors
            continue
    return sum(storages.values())


def _engine_states(rank: int, world: int, out_path: str) -> None:
    from megatron_ls.training.distributed import init_distributed
    from megatron_ls.training.engine import build_engine

    cfg = _config(num_layers=2, hidden_size=64, ffn_hidden_size=256, vocab_size=27, mem_length=16, dropout=0.0)
    layout = init_distributed(1, 1, cfg)
    results = {}
    for stage, precision in ((0, "fp32"), (1, "fp32"), (0, "bf16"), (1, "bf16")):
        ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 1000},
              "bf16": {"enabled": precision == "bf16"}, "steps_per_print": 10**9}
        before = _live_tensor_bytes()
        engine = build_engine(cfg, ds, layout, seed=1)
        x = torch.randint(0, 27, (2, 16))
        engine.train_step(x, x)
        engine.reset_memory()
        _TABLES.clear()  # the sinusoid table shared by all layers (max(w, landmark distances) x D): not a state
        # After the step the activations and gradients are gone: parameters, optimizer states, buffers remain.
        results[(stage, precision)] = (_live_tensor_bytes() - before, engine.module.num_parameters())
        del engine
    torch.save(results, out_path)


def test_parameter_and_optimizer_bytes_match_deepspeed(tmp_path):
    out = str(tmp_path / "states.pt")
    run_distributed(_engine_states, 1, out, timeout=300)
    for (stage, precision), (measured, n_params) in torch.load(out).items():
        layout = TrainingLayout(parallel=ParallelLayout(1, zero_stage=stage), precision=precision,
                                reduce_bucket_size=1000)
        params, _, optimizer = state_bytes(n_params, layout)
        expected = params + optimizer
        assert abs(measured - expected) <= 0.01 * expected, (stage, precision, measured, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.memory_allocated measures the "
                                                          "CUDA caching allocator only")
def test_forward_allocation_matches_estimate_cuda():
    cfg = _config(mem_length=512, attention_impl="auto", num_attention_heads=4, hidden_size=64)
    model = TransformerLSLM(cfg).cuda().train()
    tokens = torch.randint(0, 256, (2, 512), device="cuda")
    memory = [torch.randn(2, 512, 64, device="cuda") for _ in range(cfg.num_layers)]
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    loss, new_memory = model(tokens, memory, labels=tokens)
    torch.cuda.synchronize()
    # Live after the forward: the saved activations, the loss and the next memory (B, M, D) per layer.
    measured = torch.cuda.memory_allocated() - start - sum(m.numel() * 4 for m in new_memory)
    from megatron_ls.model.attention import resolve_impl

    impl = resolve_impl("auto", tokens.device)
    est = estimate_memory(cfg, 512, 512, TrainingLayout(micro_batch_size=2, attention_impl=impl, device="cuda"))
    assert abs(est.activations - measured) <= 0.25 * measured, (est.activations, measured, impl)
    del loss


def test_estimate_line_names_every_part():
    est = estimate_memory(_config(mem_length=64), 64, 64, TrainingLayout())
    line = est.line(16 * GiB)
    for part in ("params", "grads", "optimizer", "activations", "memory cache", "of 16.00 GiB", "MiB"):
        assert part in line


# ---- pretrain_char_lm.py's check ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tu.make_shards(str(tmp_path_factory.mktemp("data") / "pydoc"))


def _run_args(data: str) -> list[str]:
    return ["--data-path", data, *tu.TINY, "--train-iters", "1", "--eval-iters", "0", "--global-batch-size", "4"]


def _estimate_total(argv: list[str], world: int) -> int:
    """The estimate pretrain_char_lm.py computes for these flags, on CPU."""
    from megatron_ls.training.arguments import finalize_args, parse_args
    from megatron_ls.training.ds_config import build_ds_config
    from megatron_ls.training.memory_check import training_layout

    args = finalize_args(parse_args(argv), world_size=world)
    ds = build_ds_config(args, on_cpu=True)
    cfg = TransformerLSConfig(**{**args.model, "vocab_size": 256}, seq_length=args.seq_length)
    return estimate_memory(cfg, args.seq_length, cfg.mem_length, training_layout(args, cfg, ds, "cpu")).total


def test_refuses_a_layout_that_cannot_fit_on_every_rank(data):
    argv = _run_args(data)
    need, with_ckpt = _estimate_total(argv, 2), _estimate_total(argv + ["--checkpoint-activations"], 2)
    assert with_ckpt < need
    limit_gib = str((need + with_ckpt) / 2 / 0.95 / GiB)  # fits only with checkpointing
    results = tu.wait_all(tu.spawn_ranks(argv + ["--device-memory-gib", limit_gib], 2), timeout=120)
    for rc, _, err in results:
        assert rc != 0
        lines = tu.error_lines(err)
        assert len(lines) == 1, err
        assert "needs about" in lines[0] and "add --checkpoint-activations" in lines[0], lines[0]
    # The suggested change passes the check and trains; the estimate is printed once, by rank 0.
    results = tu.wait_all(tu.spawn_ranks(argv + ["--device-memory-gib", limit_gib, "--checkpoint-activations"], 2),
                          timeout=180)
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-2000:]
    assert results[0][1].count("memory estimate per rank") == 1 and "memory estimate" not in results[1][1]


def test_skip_memory_check_runs_anyway(data):
    result = tu.run(_run_args(data) + ["--device-memory-gib", "0.0001", "--skip-memory-check"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "memory estimate per rank" in result.stdout and "of 0.1 MiB" in result.stdout


def test_cpu_profiler_peak_sees_a_known_allocation():
    """bench/memory.py's CPU peak: a 64 MiB tensor held while 16 MiB more come and go peaks at 80 MiB."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_memory", os.path.join(tu.ROOT, "bench", "memory.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def step() -> None:
        held = torch.empty(16 * 2**20)  # 64 MiB of fp32
        for _ in range(3):
            torch.empty(4 * 2**20).fill_(1.0)  # 16 MiB, freed at once
        del held

    peak = bench.cpu_peak_bytes(step)
    assert 80 * 2**20 <= peak < 81 * 2**20, peak / 2**20



def test_sequence_parallelism_lowers_the_estimate():
    """Ulysses (--sequence-parallel-size) divides the tokens of every rank; Megatron's (--sequence-parallel) those
    of the residual stream within TP."""
    cfg = TransformerLSConfig.from_preset("enwik8-12l", attention_impl="fused")

    def total(**degrees) -> int:
        layout = TrainingLayout(parallel=ParallelLayout(8, **degrees), precision="bf16", attention_impl="fused")
        return estimate_memory(cfg, 32768, 32768, layout).total

    assert total(sp=8) < total(sp=2) < total()
    assert total(tp=2, sequence_parallel=True) < total(tp=2)
