"""The fused kernels compile for Hopper (sm_90) without a GPU: Triton lowers them to a cubin with its own ptxas.

The interpreter tests prove the kernels' arithmetic; this proves the GPU compiler accepts them (tl.dot shapes,
dtypes, layouts, shared memory within the card's limit) for the presets' geometry in bf16, the training dtype.
Runs in a subprocess because TRITON_INTERPRET=1 (set for the interpreter tests) replaces the compiler.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from repo_paths import REPO_ROOT

triton = pytest.importorskip("triton", reason="the fused kernels are written in Triton")

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
ROOT = REPO_ROOT
H100_SHARED_BYTES = 227 * 1024  # opt-in shared memory per block on sm_90


def _aot_check(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    return subprocess.run([sys.executable, "-m", "megatron_ls.kernels.aot_check", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=500)


@pytest.mark.timeout(600)
@pytest.mark.skipif(not os.access(PTXAS, os.X_OK), reason="this Triton build ships no ptxas")
def test_kernels_compile_for_sm90(tmp_path):
    """The preset's bf16 kernels (first tile, both window-position modes), specialised as a launch would be: every
    product on wgmma, none on mma.sync, and no spill in the default (table) mode."""
    compiled = []
    for match in ("bf16 dh=64 c=16 r=1 lm=1 mem", "bias_gelu"):
        res = _aot_check("--arch", "90", "--quick", "--match", match, tmp_path=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        compiled += [line for line in res.stdout.splitlines() if line.startswith("ok sm_90")]
    assert sorted({line.split()[2] for line in compiled}) == [
        "_bias_gelu_bwd_kernel", "_bias_gelu_fwd_kernel", "_bwd_landmark_kernel", "_bwd_window_kernel",
        "_delta_kernel", "_fwd_kernel", "_key_bias_kernel"]
    assert sum("pos=table" in line for line in compiled) == 2  # forward and window backward read the table
    for line in compiled:
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        shared = int(fields["shared"].rstrip("B"))
        assert shared <= H100_SHARED_BYTES and (shared > 0 or "bias_gelu" in line), line  # attention tiles stage
        if line.split()[2] in ("_fwd_kernel", "_bwd_window_kernel", "_bwd_landmark_kernel"):
            assert int(fields["wgmma"]) > 0 and fields["mma_sync"] == "0", line
        if "pos=band" not in line:
            assert fields["stack"] == "0B" and fields["spill_st"] == "0" and fields["spill_ld"] == "0", line


def test_aot_check_refuses_the_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "megatron_ls.kernels.aot_check", "--quick"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "TRITON_INTERPRET=1 is set" in res.stderr and "Traceback" not in res.stderr


_DOT_KERNEL = """
import triton
import triton.language as tl


@triton.jit
def dot_kernel(A, B, C):
    i = tl.arange(0, 64)
    a = tl.load(A + i[:, None] * 64 + i[None, :])
    b = tl.load(B + i[:, None] * 64 + i[None, :])
    tl.store(C + i[:, None] * 64 + i[None, :], tl.dot(a, b))
"""

_COUNT_PRODUCTS = r"""
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dot_kernel import dot_kernel

for arch in (70, 75, 80, 90):
    src = ASTSource(dot_kernel, {"A": "*fp16", "B": "*fp16", "C": "*fp32"}, constexprs={})
    ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4}).asm["ptx"]
    print(arch, len(re.findall(r"\bw?gmma\.|\bmma\.sync", ptx)), len(re.findall(r"\bfma\.rn\.f32", ptx)))
"""


@pytest.mark.timeout(300)
@pytest.mark.skipif(not os.access(PTXAS, os.X_OK), reason="this Triton build ships no ptxas")
def test_triton_has_no_tensor_core_products_on_volta(tmp_path):
    """Why `auto` runs the blocked path on a V100 (docs/V100.md): this Triton lowers an fp16 tl.dot to tensor-core
    MMA on sm_80 / sm_90 but to scalar fp32 FMAs on sm_70 and sm_75. If a Triton release brings Volta's MMA back,
    this fails: then re-measure and revisit FUSED_MIN_CAPABILITY."""
    (tmp_path / "dot_kernel.py").write_text(_DOT_KERNEL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", _COUNT_PRODUCTS], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = {int(a): (int(mma), int(fma)) for a, mma, fma in (line.split() for line in res.stdout.splitlines())}
    for arch in (70, 75):  # V100, T4: every multiply-add a scalar FMA (64^3 of them over 128 threads)
        assert counts[arch][0] == 0 and counts[arch][1] >= 64 * 64 * 64 // 128, counts
    assert counts[80][0] > 0 and counts[90][0] > 0
