"""TP=2 layers equal their TP=1 counterparts: outputs and (gathered) gradients."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_distributed

from megatron_ls.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelLayerNorm,
    VocabParallelEmbedding,
    mpu,
    vocab_parallel_cross_entropy,
)
from megatron_ls.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
)


class _Block(torch.nn.Module):
    """Embedding -> partitioned LayerNorm of a column-parallel projection -> row-parallel -> tied logits."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embed = VocabParallelEmbedding(vocab, width)
        self.fc1 = ColumnParallelLinear(width, 4 * width)
        self.norm = TensorParallelLayerNorm(4 * width)
        self.fc2 = RowParallelLinear(4 * width, width)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.fc2(F.gelu(self.norm(self.fc1(h))))
        logits = F.linear(copy_to_tensor_model_parallel_region(h), self.embed.weight)
        return vocab_parallel_cross_entropy(logits, targets).mean()


def _build_and_run(seed: int = 0):
    torch.manual_seed(seed)
    model = _Block(vocab=32, width=16).double()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 32, (3, 7), generator=g)
    targets = torch.randint(0, 32, (3, 7), generator=g)
    loss = model(tokens, targets)
    loss.backward()
    return model, loss


def _full_grad(param: torch.nn.Parameter) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return param.grad
    g = param.grad
    if param.partition_dim == 0:
        return gather_from_tensor_model_parallel_region(g.t().contiguous()).t()
    return gather_from_tensor_model_parallel_region(g)


def _tp_worker(rank: int, world_size: int, expected: dict) -> None:
    mpu.initialize_model_parallel(world_size, 1)
    model, loss = _build_and_run()
    torch.testing.assert_close(loss.detach(), expected["loss"], rtol=1e-10, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(_full_grad(p), expected[name], rtol=1e-8, atol=1e-10, msg=name)
    dist.barrier()


@pytest.mark.timeout(120)
def test_tensor_parallel_layers_match_single_process():
    mpu.destroy_model_parallel()
    model, loss = _build_and_run()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    expected["loss"] = loss.detach()
    run_distributed(_tp_worker, 2, expected, timeout=100)


def test_bad_parallel_sizes_name_the_problem():
    from megatron_ls.errors import ParallelConfigError
    from megatron_ls.parallel.layout import ParallelLayout

    with pytest.raises(ParallelConfigError, match="not divisible"):
        ParallelLayout(world_size=6, tp=4, pp=1)


def _gathered(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _rng_worker(rank: int, world_size: int) -> None:
    from megatron_ls.model.config import TransformerLSConfig
    from megatron_ls.model.mlp import MLP
    from megatron_ls.parallel import model_parallel_seed, tensor_parallel_rng

    mpu.initialize_model_parallel(world_size, 1)
    ones = torch.ones(4096)
    model_parallel_seed(1234)
    before = F.dropout(ones, 0.5)
    with tensor_parallel_rng():
        tracked = F.dropout(ones, 0.5)
    after = F.dropout(ones, 0.5)
    a, t, b = _gathered(before), _gathered(tracked), _gathered(after)
    assert torch.equal(a[0], a[1]) and torch.equal(b[0], b[1]), "default stream must agree across TP ranks"
    assert not torch.equal(t[0], t[1]), "the tracked stream must differ across TP ranks"
    # The fork leaves the default stream where it was, and the tracked stream is reproducible from the seed.
    torch.manual_seed(1234)
    assert torch.equal(F.dropout(ones, 0.5), before) and torch.equal(F.dropout(ones, 0.5), after)
    model_parallel_seed(1234)
    with tensor_parallel_rng():
        assert torch.equal(F.dropout(ones, 0.5), tracked)

    # In the model: the MLP's dropout on its head-sharded activation differs across ranks, the one on its replicated
    # output agrees (otherwise the residual stream would diverge between TP ranks).
    cfg = TransformerLSConfig(vocab_size=27, num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=64,
                              window_size=8, chunk_size=4, dropout=0.5)
    torch.manual_seed(0)
    mlp = MLP(cfg).train()
    masks: list[torch.Tensor] = []
    mlp.dropout.register_forward_hook(lambda _m, _i, out: masks.append(out == 0))
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(3))
    model_parallel_seed(99)
    y = mlp(x)
    sharded, replicated = masks
    assert sharded.shape[-1] == 64 // world_size and sharded.any() and replicated.any()
    s, r, out = _gathered(sharded.to(torch.uint8)), _gathered(replicated.to(torch.uint8)), _gathered(y.detach())
    assert not torch.equal(s[0], s[1])
    assert torch.equal(r[0], r[1]) and torch.equal(out[0], out[1])
    mpu.destroy_model_parallel()


@pytest.mark.timeout(120)
def test_rng_tracker_dropout_differs_inside_sharded_parts_and_agrees_outside():
    run_distributed(_rng_worker, 2, timeout=100)
