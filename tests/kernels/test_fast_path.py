"""The rest of the layer on the fast path: the optimizer DeepSpeed builds on CUDA vs CPU, and the chunked loss.

The loss must give the numbers of F.cross_entropy on fp32-upcast logits (the previous path) and keep no full-size
fp32 copy of bf16 logits for the backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_ls.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_ls.training.arguments import finalize_args, parse_args
from megatron_ls.training.ds_config import build_ds_config

ARGS = ["--data-path", "d/p", "--seq-length", "64", "--train-iters", "10", "--num-layers", "2", "--hidden-size",
        "32", "--num-attention-heads", "2", "--window-size", "16", "--chunk-size", "8", "--bf16"]


def _optimizer_params(on_cpu: bool, ds_json: str | None = None) -> dict:
    argv = ARGS + (["--deepspeed_config", ds_json] if ds_json else [])
    return build_ds_config(finalize_args(parse_args(argv), world_size=1), on_cpu=on_cpu)["optimizer"]["params"]


def test_ds_config_optimizer_cuda_vs_cpu():
    cpu, cuda = _optimizer_params(on_cpu=True), _optimizer_params(on_cpu=False)
    assert cpu["torch_adam"] is True and "fused" not in cpu  # torch's AdamW, no JIT build
    assert cuda["torch_adam"] is True and cuda["fused"] is True  # torch's fused AdamW kernel
    assert {k: v for k, v in cuda.items() if k != "fused"} == cpu


def test_ds_config_keeps_a_users_fusedadam(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"optimizer": {"type": "AdamW", "params": {"torch_adam": false}}}')
    cuda = _optimizer_params(on_cpu=False, ds_json=str(path))
    assert cuda["torch_adam"] is False and "fused" not in cuda  # DeepSpeed's FusedAdam, which takes no `fused`


def test_cuda_optimizer_params_build_torch_fused_adamw():
    """What DeepSpeed does with them (engine._configure_basic_optimizer with torch_adam)."""
    params = dict(_optimizer_params(on_cpu=False))
    params.pop("torch_adam")
    weight = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.AdamW([weight], **params, foreach=None)
    assert opt.defaults["fused"] is True
    weight.grad = torch.ones_like(weight)
    before = weight.detach().clone()
    opt.step()  # torch's fused AdamW also runs on CPU tensors
    ref = torch.optim.AdamW([p := torch.nn.Parameter(before.clone())], **{**params, "fused": False})
    p.grad = torch.ones_like(p)
    ref.step()
    torch.testing.assert_close(weight.detach(), p.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1 << 22, 100])  # one chunk; many chunks with a ragged last one
def test_chunked_cross_entropy_matches_upcast_path(dtype, chunk):
    torch.manual_seed(0)
    logits = (torch.randn(3, 50, 256) * 4).to(dtype).requires_grad_()
    target = torch.randint(0, 256, (3, 50))
    grad_out = torch.rand(3, 50)
    loss = vocab_parallel_cross_entropy(logits, target, chunk_elements=chunk)
    (loss * grad_out).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.float().flatten(0, 1), target.flatten(), reduction="none").view_as(target)
    (ref * grad_out).sum().backward()
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-6 if dtype == torch.float32 else 0,
                               atol=1e-7 if dtype == torch.float32 else 1e-2 / 256)


def test_chunked_cross_entropy_keeps_no_fp32_copy_of_bf16_logits():
    logits = torch.randn(4, 64, 256, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 256, (4, 64))
    saved: dict[int, tuple[int, torch.dtype]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vocab_parallel_cross_entropy(logits, target)
    full_fp32 = logits.numel() * 4
    assert all(not (dtype == torch.float32 and n >= full_fp32) for n, dtype in saved.values()), saved
    assert sum(n for n, _ in saved.values()) < logits.numel() * 2 + 4 * 64 * (4 + 8) + 1


# ---- the FLOPs counter behind bench/train_throughput.py's MFU -----------------------------------------------------
def _linear_flops_by_module(config, M: int) -> dict[str, int]:
    """FLOPs torch's counter attributes to each Linear of a one-sequence forward of N = 64 tokens, M of memory."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_ls.model.lm import TransformerLSLM

    model = TransformerLSLM(config).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 64))
    memory = [torch.randn(1, M, config.hidden_size) for _ in range(config.num_layers)] if M else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(tokens, memory)
    return {name: sum(v.values()) for name, v in counter.get_flop_counts().items()}


@pytest.mark.parametrize("attention_type", ["long-short", "full"])
def test_flops_of_projections_and_mlp_match_torch_counter(attention_type):
    from megatron_ls.model.config import TransformerLSConfig
    from megatron_ls.training.flops import layer_forward_flops

    cfg = TransformerLSConfig(vocab_size=256, num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                              window_size=32, chunk_size=8, mem_length=64, attention_type=attention_type)
    M = 64 if attention_type == "long-short" else 0  # FlopCounterMode cannot trace full's lower-right causal bias
    counted = _linear_flops_by_module(cfg, M)
    ours = layer_forward_flops(cfg, 64, M)
    prefix = "TransformerLSLM.layers.0."
    mlp = counted[prefix + "mlp.fc1"] + counted[prefix + "mlp.fc2"]
    assert ours["mlp"] == mlp
    q_o = counted[prefix + "attention.query"] + counted[prefix + "attention.dense"]
    assert ours["q_o"] == q_o
    if attention_type == "full":
        assert ours["k_v"] == counted[prefix + "attention.key"] + counted[prefix + "attention.value"]
    else:
        assert ours["r_win"] == counted[prefix + "attention.r_win_net"]


def test_flops_scale_linearly_for_long_short_and_quadratically_for_full():
    from megatron_ls.model.config import TransformerLSConfig
    from megatron_ls.training.flops import training_flops

    ls = TransformerLSConfig.from_preset("enwik8-12l", mem_length=0)
    full = TransformerLSConfig.from_preset("enwik8-12l", mem_length=0, attention_type="full")
    ratio_ls = training_flops(ls, 1, 8192, 0) / training_flops(ls, 1, 2048, 0)
    ratio_full = training_flops(full, 1, 8192, 0) / training_flops(full, 1, 2048, 0)
    assert 4.0 <= ratio_ls < 4.6 and ratio_full > 5.0  # landmarks grow slowly; full attention's scores quadratically
