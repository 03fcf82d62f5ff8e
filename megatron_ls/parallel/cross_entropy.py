"""Cross entropy over logits whose vocabulary is split across tensor-parallel ranks.

The full logits are never gathered: each rank reduces its max, its target logit and its
sum of exponentials, and the backward is softmax minus one-hot on the local partition.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_ls.parallel import mpu


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        group = mpu.get_tensor_model_parallel_group()
        logits = _at_least_fp32(logits)
        logits_max = logits.max(dim=-1)[0]
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        per_rank = logits.shape[-1]
        start = per_rank * mpu.get_tensor_model_parallel_rank()
        outside = (target < start) | (target >= start + per_rank)
        local_target = (target - start).masked_fill(outside, 0)
        predicted = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(predicted, group=group)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - predicted

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, outside, local_target = ctx.saved_tensors
        grad = softmax
        onehot = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot)
        return grad * grad_loss.unsqueeze(-1), None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss in nats, shape of `target`; `logits` is this rank's vocab partition (fp32 math)."""
    if mpu.get_tensor_model_parallel_world_size() == 1:
        flat = F.cross_entropy(_at_least_fp32(logits).flatten(0, -2), target.reshape(-1), reduction="none")
        return flat.view_as(target)
    return _VocabParallelCrossEntropy.apply(logits, target)
