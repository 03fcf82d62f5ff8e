"""The model under tensor parallelism: TP=2 computes what one process computes (2 gloo processes)."""

from __future__ import annotations

import torch

from tests.distributed import run_distributed


def _tp_matches_single_process(rank: int, world_size: int) -> None:
    for attention_type in ("long-short", "full"):
        _compare(rank, attention_type)


def _compare(rank: int, attention_type: str) -> None:
    from megatron_ls.model import TransformerLSConfig, TransformerLSLM
    from megatron_ls.parallel import mpu

    cfg = TransformerLSConfig(vocab_size=27, num_layers=2, hidden_size=32, num_attention_heads=4,
                              ffn_hidden_size=64, window_size=16, chunk_size=4, chunk_rank=2, mem_length=16,
                              dropout=0.0, attention_type=attention_type, attention_impl="blocked")
    tokens = torch.randint(0, 27, (2, 48), generator=torch.Generator().manual_seed(7))

    def run(model):
        memory, losses, logits = None, [], []
        for s in range(0, 48, 16):
            seg = tokens[:, s:s + 16]
            out, _ = model(seg, memory)
            loss, memory = model(seg, memory, labels=seg.roll(-1, 1))
            loss.mean().backward()
            losses.append(loss.detach())
            logits.append(out.detach())
        return torch.cat(losses, 1), torch.cat(logits, 1)

    # The one-process model runs entirely before TP exists (its layers ask mpu at every call).
    torch.manual_seed(0)
    single = TransformerLSLM(cfg).double()
    loss1, logits1 = run(single)
    mpu.initialize_model_parallel(2, 1)
    torch.manual_seed(0)
    sharded = TransformerLSLM(cfg).double()
    assert sharded.padded_vocab_size == 28  # one masked padding row
    loss2, logits2 = run(sharded)
    mpu.destroy_model_parallel()
    torch.testing.assert_close(loss2, loss1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits2, logits1, rtol=1e-10, atol=1e-10)

    for (name, p1), (_, p2) in zip(single.named_parameters(), sharded.named_parameters()):
        g1 = p1.grad
        if getattr(p2, "tensor_model_parallel", False):
            g1 = torch.nn.functional.pad(g1, (0, 0, 0, 1)) if name == "embedding.weight" else g1
            g1 = g1.chunk(2, dim=p2.partition_dim)[rank]
        torch.testing.assert_close(p2.grad, g1, rtol=1e-8, atol=1e-10, msg=f"{attention_type}: {name}")


def test_tp2_equals_single_process():
    """Losses, logits and gradients over 3 segments with memory; vocabulary 27 padded to 28."""
    run_distributed(_tp_matches_single_process, 2, timeout=120)
