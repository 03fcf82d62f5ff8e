"""Shared pieces of the parallel-equivalence tests: a tiny model, streams of tokens, one training run per rank.

`train_and_record` runs on every rank of a spawned group: it builds the engine for a layout, trains a few steps on
consecutive segments of fixed lanes (so the memory is used), and writes what this rank saw (losses, grad norms, and
its gradients gathered over TP and DP, named as in TransformerLSLM) to out_dir/rank{r}.pt for the parent to compare.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.parallel import mpu
from megatron_ls.parallel.mappings import gather_from_tensor_model_parallel_region

SEQ, STEPS, LANES, SEED = 16, 3, 4, 1234


def tiny_config(**overrides: Any) -> TransformerLSConfig:
    # vocab 27 is padded to 28 under TP=2: the padding columns are exercised too.
    base = dict(vocab_size=27, num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                window_size=16, chunk_size=8, chunk_rank=1, mem_length=16, dropout=0.0, seq_length=SEQ)
    return TransformerLSConfig(**{**base, **overrides})


def ds_config(zero_stage: int, micro: int, dp: int, **extra: Any) -> dict[str, Any]:
    cfg = {"train_batch_size": LANES, "train_micro_batch_size_per_gpu": micro,
           "gradient_accumulation_steps": LANES // (micro * dp),
           # SGD, not Adam: Adam's first step is lr * sign(g), which turns rounding noise on (near-)zero
           # gradients into full-size updates and would hide real differences behind fake ones.
           "optimizer": {"type": "SGD", "params": {"lr": 0.3, "weight_decay": 0.01}},
           "zero_allow_untested_optimizer": True,
           "gradient_clipping": 1.0,  # active: the first step's norm is about 1.2
           "zero_optimization": {"stage": zero_stage}, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    cfg.update(extra)
    return cfg


def streams(vocab: int = 27, lanes: int = LANES, steps: int = STEPS, seq: int = SEQ, seed: int = 7) -> torch.Tensor:
    """(lanes, steps * seq + 1) tokens: each lane is one continuous stream."""
    return torch.randint(0, vocab, (lanes, steps * seq + 1), generator=torch.Generator().manual_seed(seed))


def segment(data: torch.Tensor, step: int, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    window = data[:, step * seq: (step + 1) * seq + 1]
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def full_gradients(engine) -> dict[str, torch.Tensor]:
    """This rank's gradients, reduced over DP and gathered over TP, keyed by TransformerLSLM parameter name."""
    from deepspeed.utils import safe_get_full_grad

    from megatron_ls.checkpoint.param_names import pipe_to_lm_name

    out = {}
    for name, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)
        if g is None:
            continue
        g = g.detach().float().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
        if getattr(p, "tensor_model_parallel", False):
            dim = p.partition_dim
            g = gather_from_tensor_model_parallel_region(g.transpose(dim, -1).contiguous()).transpose(dim, -1)
        if engine.pipelined:
            name = pipe_to_lm_name(name, engine.config.num_layers, engine.config.tie_embeddings)
        if name in ("embedding.weight", "output.weight"):
            # Rows past the vocabulary are TP padding: never read, masked in the logits, so no gradient.
            vocab = engine.config.vocab_size
            assert not g[vocab:].any(), f"{name}: gradient on padding rows"
            g = g[:vocab]
        out[name] = g.clone().cpu()
    return out


def _count_attention_calls(module: torch.nn.Module) -> list[int]:
    """A counter of attention forwards: a checkpointed layer runs its attention twice (forward + recompute)."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    for name, sub in module.named_modules():
        if name.endswith("attention"):
            sub.register_forward_pre_hook(hook)
    return calls


def _run(engine_factory, layout, plan: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Train STEPS steps of consecutive segments on this DP rank's lanes, as `plan` says."""
    data, eval_data = streams(), streams(lanes=LANES, seed=8)
    per_rank = LANES // layout.dp
    lanes = slice(layout.dp_rank * per_rank, (layout.dp_rank + 1) * per_rank)
    engine = engine_factory()
    grads: list[dict[str, torch.Tensor]] = []

    def watch(e) -> list[int]:
        if plan.get("loss_weights"):  # --loss-weight: token t's loss scaled by t % 3 (0, 1 or 2)
            e.set_loss_weights((torch.arange(e.config.vocab_size) % 3).float())
        if plan.get("grads", True):
            e.add_pre_step_hook(lambda: grads.append(full_gradients(e)))
        return _count_attention_calls(e.module)

    calls = watch(engine)
    losses, norms, lrs, evals = [], [], [], []
    for step in range(STEPS):
        if step == plan.get("resume_at"):
            # Save, start a fresh engine (fresh weights), load: the run must continue as if never stopped.
            ckpt = os.path.join(out_dir, "ckpt")
            engine.save_checkpoint(ckpt, tag=f"step{step}", client_state={"step": step})
            memory = engine.memory_state_dict()
            engine = engine_factory()
            path, client = engine.load_checkpoint(ckpt, tag=f"step{step}")
            assert path is not None and client["step"] == step, (path, client)
            engine.load_memory_state_dict(memory)
            calls = watch(engine)
        if plan.get("memory_roundtrip") and step > 0:
            state = engine.memory_state_dict()
            engine.reset_memory()
            engine.load_memory_state_dict(state)
        if plan.get("reset_each_step"):
            engine.reset_memory("train")
        x, y = segment(data, step)
        losses.append(engine.train_step(x[lanes], y[lanes]))
        norms.append(engine.grad_norm)
        lrs.append(engine.lr)
        if plan.get("evals"):
            ex, ey = segment(eval_data, step)
            evals.append(engine.eval_step(ex[lanes], ey[lanes]))
    return {"losses": losses, "norms": norms, "lrs": lrs, "grads": grads, "evals": evals,
            "attention_calls": calls[0]}


def train_and_record(rank: int, world: int, out_dir: str, tp: int, pp: int, plans: list[dict[str, Any]],
                     config_overrides: dict | None = None, micro: int = 1, sp: int = 1,
                     sequence_parallel: bool = False) -> None:
    """Run each plan ({"zero": stage, "ckpt": bool, "evals": bool, ...}) in this process group; save the results."""
    from megatron_ls.training.distributed import init_distributed, layout_for
    from megatron_ls.training.engine import build_engine

    config = tiny_config(**(config_overrides or {}))
    layout = init_distributed(layout=layout_for(world, tp, pp, config, sp=sp, sequence_parallel=sequence_parallel))
    results = []
    for plan in plans:
        def factory(plan=plan):
            extra = {"bf16": {"enabled": True}} if plan.get("bf16") else {}
            return build_engine(config, ds_config(plan.get("zero", 0), micro, layout.dp, **extra), layout, seed=SEED,
                                checkpoint_activations=plan.get("ckpt", False),
                                recompute_attention=plan.get("selective", False))

        results.append(_run(factory, layout, plan, out_dir))
    torch.save({"layout": dict(tp=layout.tp, pp=layout.pp, dp=layout.dp, sp=sp, pp_rank=layout.pp_rank,
                               dp_rank=layout.dp_rank, tp_rank=layout.tp_rank), "results": results},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    mpu.destroy_model_parallel()


def load_ranks(out_dir: str, world: int) -> list[dict[str, Any]]:
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def merged_grads(ranks: list[dict[str, Any]], run: int, step: int) -> dict[str, torch.Tensor]:
    """One model's gradients from the ranks of DP replica 0: the union over pipeline stages (TP already gathered).

    A name held by several ranks (TP ranks, or the tied embedding on the first and last stage) must agree.
    """
    merged: dict[str, torch.Tensor] = {}
    for r in ranks:
        if r["layout"]["dp_rank"] != 0:
            continue
        for name, g in r["results"][run]["grads"][step].items():
            if name in merged:
                torch.testing.assert_close(g, merged[name], rtol=0, atol=0, msg=f"{name} differs between ranks")
            else:
                merged[name] = g
    return merged


def assert_same_training(base: list[dict[str, Any]], other: list[dict[str, Any]], run: int,
                         loss_rtol: float = 1e-5, grad_rtol: float = 1e-4) -> None:
    """`other`'s run matches the one-process baseline (run 0 of `base`): losses, grad norms, gradients, evals.

    Gradients: per tensor, |g - g_ref| <= grad_rtol * |g_ref| + 1e-6 * |G_ref| (2-norms; G the whole gradient). The
    second term is for tensors whose exact gradient is zero (e.g. the bias of the dynamic projection, which a softmax
    over chunk positions cancels) and which hold rounding noise only.
    """
    ref = base[0]["results"][0]
    for r in other:
        got = r["results"][run]
        torch.testing.assert_close(torch.tensor(got["losses"], dtype=torch.float64),
                                   torch.tensor(ref["losses"], dtype=torch.float64), rtol=loss_rtol, atol=0)
        torch.testing.assert_close(torch.tensor(got["norms"], dtype=torch.float64),
                                   torch.tensor(ref["norms"], dtype=torch.float64), rtol=grad_rtol, atol=0)
        assert len(got["evals"]) == len(ref["evals"])
        for (s, n), (s_ref, n_ref) in zip(got["evals"], ref["evals"]):
            assert n == n_ref
            assert abs(s - s_ref) <= loss_rtol * abs(s_ref), (s, s_ref)
    for step in range(len(ref["grads"])):
        want, have = merged_grads(base, 0, step), merged_grads(other, run, step)
        assert set(have) == set(want), set(have) ^ set(want)
        total = torch.sqrt(sum(g.double().pow(2).sum() for g in want.values()))
        for name, g_ref in want.items():
            err = (have[name].double() - g_ref.double()).norm()
            bound = grad_rtol * g_ref.double().norm() + 1e-6 * total
            assert err <= bound, f"step {step} {name}: |diff| {err:.3e} > {bound:.3e} (|g| {g_ref.norm():.3e})"


def assert_bf16_close(base: list[dict[str, Any]], other: list[dict[str, Any]], run: int) -> None:
    """A bf16 run follows the fp32 baseline within bf16's precision: losses, evaluation and the (clipped) grad norm.

    The norm check catches a norm summed over the wrong ranks (which also changes the clipping).
    """
    ref = base[0]["results"][0]
    for r in other:
        got = r["results"][run]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=3e-3, atol=0)
        torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(ref["norms"]), rtol=2e-2, atol=0)
        for (s, n), (s_ref, n_ref) in zip(got["evals"], ref["evals"], strict=True):
            assert n == n_ref and abs(s - s_ref) <= 3e-3 * abs(s_ref), (s, s_ref)
