"""The fused (Triton) long-short attention against the dense reference.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here before the
kernels are first imported) at small sizes, in fp32 against an fp64 oracle. With CUDA they are
compiled and also checked in bf16 (relative error <= 1e-2 on the output and all nine input
gradients) at sizes where the autotuned tiles are exercised.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
_KERNELS_PRELOADED = "megatron_ls.kernels.ls_forward" in sys.modules
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="the fused kernels are written in Triton")

from megatron_ls.kernels import LongShortGeometry, fused_available  # noqa: E402
from megatron_ls.kernels import long_short_attention_fused as fused_core  # noqa: E402
from megatron_ls.model.attention.blocked import long_short_attention_blocked  # noqa: E402
from megatron_ls.model.attention.common import landmark_distance_rows  # noqa: E402
from megatron_ls.model.attention.dispatch import long_short_attention  # noqa: E402
from megatron_ls.model.attention.reference import long_short_attention_reference  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
NAMES = ("q", "k_win", "v_win", "k_lm", "v_lm", "pos_bias_u", "pos_bias_v", "r_win", "r_lm")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernels, bf16 tensor cores)")

if not CUDA and _KERNELS_PRELOADED and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels were imported before TRITON_INTERPRET=1 could be set; run this file alone",
                allow_module_level=True)



def long_short_attention_fused(*tensors, window, chunk, chunk_rank, mem_len, softmax_scale=None):
    """The kernels' entry with the keyword geometry the other implementations take."""
    return fused_core(*tensors, LongShortGeometry(window, chunk, chunk_rank, mem_len, softmax_scale))

def make_inputs(B, H, N, dh, w, c, r, M, clamp=None, landmarks=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = min(M, w - 1)
    L = (M + N) // c * r if landmarks else 0
    nd = landmark_distance_rows((M + N) // c, clamp)
    shapes = [(B, H, N, dh), (B, H, P + N, dh), (B, H, P + N, dh), (B, H, L, dh), (B, H, L, dh), (H, dh), (H, dh),
              (H, w, dh), (H, nd, dh)]
    scales = [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    return [(torch.randn(s, generator=g, dtype=torch.float64) * a).to(DEVICE, dtype)
            for s, a in zip(shapes, scales)], dict(window=w, chunk=c, chunk_rank=r, mem_len=M)


def run(fn, tensors, geo, grad_out, **kw):
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*ts, **geo, **kw)
    grads = torch.autograd.grad(out, ts, grad_out.to(out.dtype), allow_unused=True)
    return out, [gr if gr is not None else torch.zeros_like(t) for gr, t in zip(grads, ts)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item() if b.numel() else 0.0


def compare(tensors64, geo, dtype, tol, **kw):
    """Fused in `dtype` vs the reference in fp64 on the same (rounded) inputs; returns the errors."""
    rounded = [t.to(dtype).double() for t in tensors64]
    grad_out = torch.randn(rounded[0].shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).to(DEVICE)
    ref_out, ref_grads = run(long_short_attention_reference, rounded, geo, grad_out, **kw)
    out, grads = run(long_short_attention_fused, [t.to(dtype) for t in tensors64], geo, grad_out, **kw)
    assert out.dtype == dtype and out.shape == ref_out.shape
    errs = {"out": rel_err(out, ref_out)}
    errs.update({n: rel_err(gr, rg) for n, gr, rg in zip(NAMES, grads, ref_grads)})
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    return errs


# (B, H, N, dh, w, c, r, M, clamp, landmarks): small enough for the interpreter (~1 s each).
SMALL = {
    "no_memory": (1, 2, 40, 16, 16, 8, 1, 0, None, True),         # N=40: not a multiple of the 16-row block
    "memory": (1, 2, 40, 16, 16, 8, 1, 16, None, True),           # P = min(M, w-1) = 15 window keys in memory
    "rank2_clamped": (1, 2, 48, 16, 16, 8, 2, 32, 2, True),       # r=2, distance clamp at 2
    "window_only": (1, 2, 40, 16, 16, 8, 1, 8, None, False),      # no landmarks (L = 0)
    "rank3_batch2": (2, 1, 36, 16, 8, 4, 3, 8, None, True),       # B=2, c=4, w=8, r=3
    # Several blocks of the CUDA tiles too (tests/kernels/test_kernels_tiles.py runs these with each of them):
    "multi_block": (1, 2, 152, 16, 48, 8, 1, 40, None, True),     # 3 query blocks of 64, ragged, memory
    "multi_block_r2": (1, 1, 132, 16, 40, 4, 2, 24, 6, True),     # 78 landmarks: 2+ landmark blocks, clamp
}


@pytest.fixture(params=["band", "table"])
def window_pos(request, monkeypatch):
    """Both ways of getting the window position term (MEGATRON_LS_WINDOW_POS)."""
    monkeypatch.setenv("MEGATRON_LS_WINDOW_POS", request.param)
    return request.param


@pytest.mark.parametrize("case", list(SMALL))
def test_fused_fp32_matches_reference(case, window_pos):
    B, H, N, dh, w, c, r, M, clamp, lm = SMALL[case]
    tensors, geo = make_inputs(B, H, N, dh, w, c, r, M, clamp, lm)
    compare(tensors, geo, torch.float32, 1e-5)


def test_fused_reads_the_layers_layouts_in_place():
    """The attention layer passes q as a transposed view of its (B, N, H, dh) projection and each k, v as a half of
    [k | v] rows (one DualLN call over both): the kernels read them where they are (no copy) and give the same
    bits as on contiguous (B, H, L, dh) inputs, gradients included (returned in the same token-major layout)."""
    from megatron_ls.kernels.ls_forward import row_stride, token_major

    tensors, geo = make_inputs(1, 2, 40, 16, 16, 8, 2, 16, dtype=torch.float32)
    grad_out = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(2))
    out_a, grads_a = run(long_short_attention_fused, tensors, geo, grad_out)

    q, kw, vw, kl, vl, *rest = tensors
    q_rows = q.transpose(1, 2).contiguous().requires_grad_()  # (B, N, H, dh), the projection's layout
    win, lm = (torch.stack([k.transpose(1, 2), v.transpose(1, 2)], 2).requires_grad_() for k, v in ((kw, vw), (kl, vl)))
    rest = [t.clone().requires_grad_() for t in rest]
    laid_out = [q_rows.transpose(1, 2), win[:, :, 0].transpose(1, 2), win[:, :, 1].transpose(1, 2),
                lm[:, :, 0].transpose(1, 2), lm[:, :, 1].transpose(1, 2)]
    assert all(token_major(t) is t for t in laid_out) and row_stride(laid_out[1]) == 2 * 2 * 16
    out_b = long_short_attention_fused(*laid_out, *rest, **geo)
    assert out_b.transpose(1, 2).is_contiguous()  # the layer's (B, N, H dh) reshape is a view
    grads_b = torch.autograd.grad(out_b, [q_rows, win, lm, *rest], grad_out)
    dq, dwin, dlm, *drest = grads_b
    unpacked = [dq.transpose(1, 2), dwin[:, :, 0].transpose(1, 2), dwin[:, :, 1].transpose(1, 2),
                dlm[:, :, 0].transpose(1, 2), dlm[:, :, 1].transpose(1, 2), *drest]
    # The same bits under the interpreter (programs run in order); on a GPU dQ's atomics may add in another order.
    tol = dict(rtol=1e-6, atol=1e-7) if CUDA else dict(rtol=0, atol=0)
    for a, b in zip([out_a, *grads_a], [out_b, *unpacked]):
        torch.testing.assert_close(b, a, **tol)


def test_fused_rejects_an_unknown_window_pos_mode(monkeypatch):
    monkeypatch.setenv("MEGATRON_LS_WINDOW_POS", "diagonal")
    tensors, geo = make_inputs(1, 1, 16, 16, 16, 8, 1, 0, dtype=torch.float32)
    with pytest.raises(ValueError, match="MEGATRON_LS_WINDOW_POS must be one of band, table, got 'diagonal'"):
        long_short_attention_fused(*tensors, **geo)


def test_fused_softmax_scale():
    tensors, geo = make_inputs(1, 2, 32, 16, 16, 8, 1, 16)
    compare(tensors, geo, torch.float32, 1e-5, softmax_scale=0.3)


def test_fused_dropout_falls_back_to_blocked():
    """The dispatcher runs `blocked` when `fused` is asked for dropout on the probabilities."""
    tensors, geo = make_inputs(1, 2, 32, 16, 16, 8, 1, 16, dtype=torch.float32)
    torch.manual_seed(3)
    a = long_short_attention(*tensors, **geo, dropout_p=0.25, impl="fused")
    torch.manual_seed(3)
    b = long_short_attention_blocked(*tensors, **geo, dropout_p=0.25)
    torch.testing.assert_close(a, b)


def test_fused_rejects_bad_head_dim():
    tensors, geo = make_inputs(1, 1, 16, 24, 16, 8, 1, 0, dtype=torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        long_short_attention_fused(*tensors, **geo)


def test_fused_available_here():
    assert fused_available() == (CUDA or os.environ.get("TRITON_INTERPRET") == "1")


# ---- CUDA only: compiled kernels, autotuned tiles, bf16 ----
LARGE = {
    "bf16_memory_r1": (2, 4, 1024, 64, 256, 16, 1, 512, None, True),
    "bf16_memory_r2_ragged": (1, 4, 1008, 64, 128, 16, 2, 256, None, True),  # N=1008: ragged last block
    "bf16_no_memory_clamped": (2, 2, 768, 64, 512, 16, 1, 0, 16, True),
    "bf16_window_only": (1, 4, 512, 64, 128, 16, 1, 128, None, False),
}


@needs_cuda
@pytest.mark.parametrize("case", list(LARGE))
def test_fused_bf16_matches_reference_cuda(case, window_pos):
    B, H, N, dh, w, c, r, M, clamp, lm = LARGE[case]
    tensors, geo = make_inputs(B, H, N, dh, w, c, r, M, clamp, lm)
    errs = compare(tensors, geo, torch.bfloat16, 1e-2)
    print(case, window_pos, {k: f"{e:.1e}" for k, e in errs.items()})


@needs_cuda
def test_fused_fp32_matches_reference_cuda(window_pos):
    tensors, geo = make_inputs(1, 2, 520 - 8, 64, 128, 16, 2, 64)
    compare(tensors, geo, torch.float32, 1e-5)


@needs_cuda
def test_fused_under_autocast_cuda():
    tensors, geo = make_inputs(1, 2, 256, 64, 64, 16, 1, 64, dtype=torch.float32)
    ts = [t.requires_grad_() for t in tensors]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = long_short_attention_fused(*ts, **geo)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for t in ts)
    ref = long_short_attention_reference(*[t.detach() for t in ts], **geo)
    assert rel_err(out.float(), ref) <= 1e-2


# ---- The work account (bench/kernel_work.py) against what the interpreter executes ----
WORK_CASES = {"memory_ragged": SMALL["multi_block"], "rank2_clamped": SMALL["multi_block_r2"],
              "no_memory": (1, 1, 96, 16, 32, 8, 1, 0, None, True), "window_only": SMALL["window_only"]}


@pytest.mark.skipif(CUDA, reason="counts what Triton's interpreter executes")
@pytest.mark.parametrize("case", list(WORK_CASES))
def test_work_account_equals_what_the_kernels_execute(case, window_pos):
    """megatron_ls.kernels.work counts each launch's dots, bytes and atomics from its grid, tile and loop bounds;
    the interpreter counts what the kernels do. Equal for every kernel (kernels/test_kernels_tiles.py: every
    tile)."""
    from megatron_ls.kernels.launches import CoreGeometry, recorded_launches
    from megatron_ls.kernels.work import Work, launch_work
    from tests.triton_interpreter import executed_work

    B, H, N, dh, w, c, r, M, clamp, lm = WORK_CASES[case]
    geo = CoreGeometry(B, H, N, M, dh, w, c, r, clamp, lm)
    with recorded_launches() as launches:
        out = fused_core(*geo.inputs(torch.float32), geo.spec())
        out.backward(torch.zeros_like(out))
    account = {}
    for launch in launches:  # the key bias runs in the forward and again in the backward
        account.setdefault(launch.name, Work())
        account[launch.name] += launch_work(launch)
    assert len(account) == (5 if lm else 4) and len(launches) == len(account) + 1

    tensors, kw = make_inputs(B, H, N, dh, w, c, r, M, clamp, lm, dtype=torch.float32)
    with executed_work() as executed:
        run(long_short_attention_fused, tensors, kw, torch.ones(B, H, N, dh))
    assert executed.keys() == account.keys()
    for name, work in account.items():
        assert executed[name].dots == work.dots, name
        assert (executed[name].bytes, executed[name].atomics) == (work.bytes, work.atomics), name
    assert account["_bwd_window_kernel"].flops > 0 and account["_bwd_window_kernel"].atomics > 0


# ---- bf16 numerics: the kernels' own rounding points, run under an interpreter that computes bf16 like a GPU ----
BF16_CASES = {"memory": SMALL["memory"], "rank2_clamped": SMALL["rank2_clamped"],
              "multi_block_r2": SMALL["multi_block_r2"], "rank3_batch2": SMALL["rank3_batch2"],
              "preset_dims": (1, 2, 256, 64, 64, 16, 1, 128, None, True)}  # the presets' dh 64, c 16, r 1


@pytest.mark.skipif(CUDA, reason="emulates bf16 in Triton's interpreter (the CUDA tests run real bf16)")
def test_bf16_emulation_computes_values_not_bit_patterns():
    import triton
    import triton.language as tl

    from tests.triton_interpreter import bf16_emulation

    @triton.jit
    def dot_kernel(A, B, OUT, R):
        offs = tl.arange(0, 16)
        a = tl.load(A + offs[:, None] * 16 + offs[None, :])
        b = tl.load(B + offs[:, None] * 16 + offs[None, :])
        tl.store(OUT + offs[:, None] * 16 + offs[None, :], tl.dot(a, b))
        tl.store(R + offs, (tl.load(A + offs).to(tl.float32) * 1.00390625).to(tl.bfloat16))  # x (1 + 2^-8)

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=g).bfloat16() for _ in range(2))
    exact = a.double() @ b.double()
    out, rounded = torch.empty(16, 16), torch.empty(16, dtype=torch.bfloat16)
    dot_kernel[(1,)](a, b, out, rounded)
    assert rel_err(out, exact) > 1.0  # the plain interpreter multiplies the uint16 bit patterns
    with bf16_emulation():
        dot_kernel[(1,)](a, b, out, rounded)
    assert rel_err(out, exact) < 1e-6  # exact bf16 products, fp32 accumulation
    assert torch.equal(rounded, (a[0].float() * 1.00390625).bfloat16())  # round to nearest even, as torch


@pytest.mark.skipif(CUDA, reason="emulates bf16 in Triton's interpreter (the CUDA tests run real bf16)")
@pytest.mark.parametrize("case", list(BF16_CASES))
def test_fused_bf16_matches_reference_emulated(case, window_pos):
    """bf16 kernels (operands rounded where the kernels load, cast and store, fp32 accumulation) against the fp64
    reference on the same bf16 inputs: output and all nine input gradients within half the 1e-2 tolerance."""
    from tests.triton_interpreter import bf16_emulation

    B, H, N, dh, w, c, r, M, clamp, lm = BF16_CASES[case]
    tensors, geo = make_inputs(B, H, N, dh, w, c, r, M, clamp, lm)
    with bf16_emulation():
        errs = compare(tensors, geo, torch.bfloat16, 5e-3)
    assert errs["out"] > 1e-4  # bf16 rounding did happen (fp32 gives ~1e-7)
    print(case, window_pos, {k: f"{e:.1e}" for k, e in errs.items()})
