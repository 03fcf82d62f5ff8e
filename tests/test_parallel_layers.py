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
    with pytest.raises(mpu.ParallelConfigError, match="not divisible"):
        mpu.check_parallel_sizes(world_size=6, tp=4, pp=1)
