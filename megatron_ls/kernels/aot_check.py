"""Compile the fused kernels for a CUDA architecture without a GPU.

Triton's interpreter (the CPU tests) is lenient where the GPU compiler is not: tl.dot shapes under
16, dtype mismatches, register pressure, layout conversions. Triton ships ptxas, so every kernel,
every autotune tile and both dtypes can be lowered to a cubin here, ahead of time:

    python -m megatron_ls.kernels.aot_check --arch 90          # H100 / H200
    python -m megatron_ls.kernels.aot_check --arch 80 --quick  # A100, one tile

Prints one line per compiled variant (registers, spills, shared memory) and exits 1 naming the first
variant that fails. Must run WITHOUT TRITON_INTERPRET=1 (an interpreted kernel has no compiler).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from megatron_ls.kernels.availability import interpreting


@dataclass(frozen=True)
class Geometry:
    """What a kernel's constexprs and integer specialisations depend on."""

    dh: int
    chunk: int
    chunk_rank: int
    has_landmarks: bool


# enwik8/text8 presets (dh 64, c 16, r 1), r > 1, a small head dim, window-only (no landmarks).
# A long chunk with few landmarks (c 128, r 8) makes the landmark distance band of a tile narrow.
GEOMETRIES = [Geometry(64, 16, 1, True), Geometry(64, 16, 4, True), Geometry(32, 8, 2, True),
              Geometry(64, 128, 8, True), Geometry(64, 16, 1, False)]
# fp16: the training dtype on V100 (sm_70, no bf16) and of --fp16 anywhere.
DTYPES = ("bf16", "fp16", "fp32")
INT_ARGS = ("H", "N", "P", "M", "L", "ND", "W", "C", "R", "n_cols")


def _signature(kernel, dtype: str, constants: dict) -> dict[str, str]:
    """Pointer arguments get a dtype (the biases u, v, b and the fp32 outputs stay fp32), integers i32."""
    fp32_ptrs = {"U", "V", "LSE", "DELTA", "DU", "DV", "DRW", "DRL", "B"}
    sig = {}
    for name in kernel.arg_names:
        if name in constants:
            sig[name] = "constexpr"
        elif name == "scale":
            sig[name] = "fp32"
        elif name in INT_ARGS:
            sig[name] = "i32"
        else:
            sig[name] = "*fp32" if name in fp32_ptrs else f"*{dtype}"
    return sig


def _kernels() -> dict[str, object]:
    from megatron_ls.kernels import ls_backward, ls_forward

    return {"forward": ls_forward._fwd_kernel, "dq": ls_backward._dq_kernel,
            "dkdv_window": ls_backward._dkdv_window_kernel, "dkdv_landmark": ls_backward._dkdv_landmark_kernel}


def _unwrap(kernel) -> tuple[object, list, dict]:
    """(JITFunction, autotune configs, heuristics) from @autotune(@heuristics(@jit))."""
    from triton.runtime.jit import JITFunction

    configs, heuristics = [], {}
    while not isinstance(kernel, JITFunction):
        configs = getattr(kernel, "configs", configs)
        heuristics = getattr(kernel, "values", heuristics)
        kernel = kernel.fn
    return kernel, configs, heuristics


def variants(quick: bool) -> Iterator[tuple[str, object, dict, str, int, int]]:
    """(label, jit function, constexprs, dtype, num_warps, num_stages) for every variant to compile."""
    for (name, wrapped), geo, dtype in itertools.product(_kernels().items(), GEOMETRIES, DTYPES):
        if name == "dkdv_landmark" and not geo.has_landmarks:
            continue
        fn, configs, heuristics = _unwrap(wrapped)
        pos_modes = ("band", "table") if "POS_TABLE" in fn.arg_names else ("",)
        for cfg, pos in itertools.product(configs[:1] if quick else configs, pos_modes):
            const = {"DH": geo.dh, "PREC": "ieee" if dtype == "fp32" else "tf32", **cfg.kwargs}
            if "HAS_LM" in fn.arg_names:
                const["HAS_LM"] = geo.has_landmarks
            if pos:
                const["POS_TABLE"] = pos == "table"
            bound = {**const, "C": geo.chunk, "R": geo.chunk_rank}
            for key, rule in heuristics.items():  # in order: a rule may read an earlier one's value
                const[key] = bound[key] = rule(bound)
            label = (f"{name} {dtype} dh={geo.dh} c={geo.chunk} r={geo.chunk_rank} lm={int(geo.has_landmarks)} "
                     f"BM={cfg.kwargs['BM']} BN={cfg.kwargs['BN']} warps={cfg.num_warps} stages={cfg.num_stages}"
                     + (f" pos={pos}" if pos else ""))
            yield label, fn, const, dtype, cfg.num_warps, cfg.num_stages
    from megatron_ls.kernels import bias_gelu

    elementwise = {"bias_gelu_fwd": bias_gelu._bias_gelu_fwd_kernel, "bias_gelu_bwd": bias_gelu._bias_gelu_bwd_kernel}
    for name, fn in elementwise.items():
        for dtype in DTYPES:
            yield f"{name} {dtype} BLOCK={bias_gelu._BLOCK}", fn, {"BLOCK": bias_gelu._BLOCK}, dtype, 4, 1


def compile_variant(fn, constants: dict, dtype: str, arch: int, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, _signature(fn, dtype, constants), constexprs=constants)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(kernel) -> str:
    """Registers and stack (spill) bytes per thread from the cubin, via the cuobjdump Triton ships; '' if absent."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(tool, os.X_OK):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f" regs={usage[1]} stack={usage[2]}B" if usage else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200, 80: A100)")
    ap.add_argument("--quick", action="store_true", help="only the first autotune tile of each kernel")
    ap.add_argument("--match", action="append", default=[], metavar="TEXT",
                    help="only variants whose label contains TEXT (repeatable: all must match), e.g. 'dq bf16'")
    args = ap.parse_args(argv)
    if interpreting():
        print("aot_check: error: TRITON_INTERPRET=1 is set; unset it to compile the kernels", file=sys.stderr)
        return 2
    n = 0
    t0 = time.monotonic()
    for label, fn, const, dtype, warps, stages in variants(args.quick):
        if not all(m in label for m in args.match):
            continue
        try:
            kernel = compile_variant(fn, const, dtype, args.arch, warps, stages)
        except Exception as e:  # the compiler's own message names the line; keep its first lines
            msg = "\n  ".join(str(e).strip().splitlines()[:12])
            print(f"aot_check: error: sm_{args.arch} {label}: {type(e).__name__}: {msg}", file=sys.stderr)
            return 1
        print(f"ok sm_{args.arch} {label} shared={kernel.metadata.shared}B{resource_usage(kernel)}", flush=True)
        n += 1
    if n == 0:
        print(f"aot_check: error: no kernel variant matches {args.match}", file=sys.stderr)
        return 2
    print(f"compiled {n} kernel variants for sm_{args.arch} in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
