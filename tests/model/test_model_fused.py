"""The whole LM with the fused kernels equals the LM with the blocked core: logits, memory and every gradient.

The kernel tests check the attention core alone; this checks the layer's glue around it (how q, the window and
landmark keys, the biases and both position tables reach the kernel, memory across segments) on the CPU under
Triton's interpreter (TRITON_INTERPRET=1, set by conftest), for both window-position modes. fp32, tiny sizes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the fused kernels are written in Triton")

from megatron_ls.kernels import fused_available  # noqa: E402
from megatron_ls.model import TransformerLSConfig, TransformerLSLM  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not fused_available("cpu"),
                                reason="runs the kernels under Triton's interpreter on the CPU")


def _run(impl: str, state: dict | None, tokens: torch.Tensor, **overrides):
    cfg = TransformerLSConfig(vocab_size=27, num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                              window_size=16, chunk_size=8, mem_length=16, dropout=0.0, attention_impl=impl,
                              **overrides)
    torch.manual_seed(0)
    m = TransformerLSLM(cfg)
    if state is not None:
        m.load_state_dict(state)
    memory, logits = None, []
    for seg in tokens.split(24, dim=1):  # three segments, each reading the previous one's memory
        out, memory = m(seg, memory)
        logits.append(out)
    logits = torch.cat(logits, 1)
    targets = torch.roll(tokens, -1, 1)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    return m.state_dict(), logits.detach(), grads, [t.detach() for t in memory]


@pytest.mark.parametrize("window_pos", ["band", "table"])
@pytest.mark.parametrize("overrides", [{}, {"chunk_rank": 2}], ids=["r1", "r2"])
def test_lm_fused_equals_blocked(window_pos, overrides, monkeypatch):
    monkeypatch.setenv("MEGATRON_LS_WINDOW_POS", window_pos)
    tokens = torch.randint(0, 27, (2, 72), generator=torch.Generator().manual_seed(1))
    state, ref_logits, ref_grads, ref_mem = _run("blocked", None, tokens, **overrides)
    from megatron_ls.kernels import long_short_fused

    calls = []
    launch = long_short_fused.long_short_forward
    monkeypatch.setattr(long_short_fused, "long_short_forward", lambda *a, **k: calls.append(k) or launch(*a, **k))
    _, logits, grads, mem = _run("fused", state, tokens, **overrides)
    assert len(calls) == 2 * 3 and all(k["pos_table"] == (window_pos == "table") for k in calls)  # layers x segments
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-5)
    for a, b in zip(mem, ref_mem):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    total = torch.cat([g.flatten() for g in ref_grads.values()]).norm().item()
    for name, g in grads.items():
        ref = ref_grads[name]
        # Plus a floor from the total norm: dproj's bias shifts a whole chunk's softmax input, so its true
        # gradient is zero and both sides hold only rounding noise.
        err = (g - ref).norm().item()
        assert err <= 1e-4 * ref.norm().item() + 1e-6 * total, (name, err, ref.norm().item())
