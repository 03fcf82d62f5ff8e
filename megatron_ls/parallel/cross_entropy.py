"""Cross entropy over logits whose vocabulary is split across tensor-parallel ranks.

The full logits are never gathered: each rank reduces its max, its target logit and its
sum of exponentials, and the backward is softmax minus one-hot on the local partition.

With one TP rank the loss runs over chunks of tokens in fp32 and keeps only the logits (in their own
dtype) for the backward, which recomputes the softmax chunk by chunk: under bf16 no full-size fp32
copy of the logits is made at all (F.cross_entropy on upcast logits made two, the copy and its
log-softmax), and in fp32 the logits are kept once instead of logits plus log-softmax.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

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


CHUNK_ELEMENTS = 1 << 22  # fp32 logits per chunk (16 MiB): the only full-precision copy that exists at once


def _chunk_rows(logits: torch.Tensor, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(logits.shape[-1], 1))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy of (T, V) logits with fp32 math on one chunk of rows at a time."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, chunk_elements: int) -> torch.Tensor:
        rows = _chunk_rows(logits, chunk_elements)
        loss = torch.empty(logits.shape[0], dtype=torch.promote_types(logits.dtype, torch.float32),
                           device=logits.device)
        lse = torch.empty_like(loss)
        for start in range(0, logits.shape[0], rows):
            part = _at_least_fp32(logits[start:start + rows])
            lse[start:start + rows] = torch.logsumexp(part, dim=-1)
            picked = part.gather(-1, target[start:start + rows, None]).squeeze(-1)
            loss[start:start + rows] = lse[start:start + rows] - picked
        ctx.save_for_backward(logits, target, lse)
        ctx.rows = rows
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, target, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            stop = start + ctx.rows
            probs = (_at_least_fp32(logits[start:stop]) - lse[start:stop, None]).exp_()
            probs.scatter_add_(-1, target[start:stop, None], probs.new_full((probs.shape[0], 1), -1.0))
            grad[start:stop] = probs.mul_(grad_loss[start:stop, None])
        return grad, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Per-token loss in nats, shape of `target`; `logits` is this rank's vocab partition (fp32 math)."""
    if mpu.get_tensor_model_parallel_world_size() == 1:
        flat = _ChunkedCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), chunk_elements)
        return flat.view_as(target)
    return _VocabParallelCrossEntropy.apply(logits, target)
