"""Compile the fused kernels for a CUDA architecture without a GPU, specialised as a launch would be.

Triton's interpreter (the CPU tests) is lenient where the GPU compiler is not: tl.dot shapes under
16, dtype mismatches, register pressure, layout conversions. Triton ships ptxas, so every kernel,
every autotune tile and both dtypes can be lowered to a cubin here, ahead of time:

    python -m megatron_ls.kernels.aot_check --arch 90          # H100 / H200
    python -m megatron_ls.kernels.aot_check --arch 80 --quick  # A100, one tile

The host code runs on meta tensors at each geometry below and its launches are recorded
(megatron_ls.kernels.launches), so each kernel is compiled with the arguments, constexprs and
specialisation (16-byte divisibility hints, integers equal to 1 as constants) of a real launch.
Prints one line per distinct compiled variant: registers, spill (stack bytes and local load/store
instructions), shared memory, and the tensor-core instructions in the SASS (HGMMA = Hopper's wgmma,
HMMA = mma.sync). Exits 1 naming the first variant that fails. Must run WITHOUT TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import torch

from megatron_ls.kernels.availability import interpreting
from megatron_ls.kernels.launches import CoreGeometry, Launch, recorded_launches

# enwik8/text8 presets (dh 64, c 16, r 1) with memory M = N and without, r > 1, a small head dim, a long
# chunk with few landmarks (a narrow landmark band), window-only (no landmarks). Sizes only matter through the
# specialisation (divisibility by 16, values equal to 1), which they share with the presets' real sizes.
GEOMETRIES = {
    "dh=64 c=16 r=1 lm=1 mem": CoreGeometry(1, 8, 2048, 2048, 64, 512, 16, 1),
    "dh=64 c=16 r=1 lm=1 nomem": CoreGeometry(1, 8, 2048, 0, 64, 512, 16, 1),
    "dh=64 c=16 r=4 lm=1 mem": CoreGeometry(1, 8, 1024, 1024, 64, 512, 16, 4),
    "dh=32 c=8 r=2 lm=1 mem": CoreGeometry(1, 8, 1024, 1024, 32, 256, 8, 2),
    "dh=64 c=128 r=8 lm=1 mem": CoreGeometry(1, 8, 2048, 2048, 64, 512, 128, 8),
    "dh=64 c=16 r=1 lm=0 mem": CoreGeometry(1, 8, 2048, 2048, 64, 512, 16, 1, landmarks=False),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # fp16: V100 (sm_70) and --fp16
POS_MODES = ("band", "table")
TOOLS = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin")


def core_launches(geo: CoreGeometry, dtype: torch.dtype, pos: str) -> list[Launch]:
    """The launches of one forward + backward of the fused core (host code on meta tensors)."""
    from megatron_ls.kernels.long_short_fused import long_short_attention_fused

    inputs = geo.inputs(dtype)
    saved = os.environ.get("MEGATRON_LS_WINDOW_POS")
    os.environ["MEGATRON_LS_WINDOW_POS"] = pos
    try:
        with recorded_launches() as launches:
            out = long_short_attention_fused(*inputs, geo.spec())
            out.backward(torch.zeros_like(out))
    finally:
        if saved is None:
            os.environ.pop("MEGATRON_LS_WINDOW_POS")
        else:
            os.environ["MEGATRON_LS_WINDOW_POS"] = saved
    return launches


def elementwise_launches(dtype: torch.dtype) -> list[Launch]:
    from megatron_ls.kernels.bias_gelu import bias_gelu

    y = torch.zeros(4, 2048, dtype=dtype, device="meta", requires_grad=True)
    b = torch.zeros(2048, dtype=dtype, device="meta", requires_grad=True)
    with recorded_launches() as launches:
        bias_gelu(y, b).backward(torch.zeros_like(y))
    return launches


def variants(quick: bool, target) -> Iterator[tuple[str, Launch, object, tuple]]:
    """(label, launch, config, specialisation) for every distinct compiled variant, in a stable order."""
    seen = set()
    jobs = [(f"{dname} {gname}", pos, lambda g=geo, d=dt, p=pos: core_launches(g, d, p))
            for gname, geo in GEOMETRIES.items() for dname, dt in DTYPES.items() for pos in POS_MODES]
    jobs += [(dname, "", lambda d=dt: elementwise_launches(d)) for dname, dt in DTYPES.items()]
    for desc, pos, make in jobs:
        for launch in make():
            uses_pos = "POS_TABLE" in launch.fn.arg_names
            if pos == "table" and not uses_pos:
                continue  # the same compile as with pos=band
            for config in launch.configs[:1] if quick else launch.configs:
                spec = launch.specialise(config, target)
                signature, constexprs, attrs, options = spec
                key = (launch.name, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                       repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
                if key in seen:
                    continue
                seen.add(key)
                meta = launch.meta(config)
                tile = " ".join(f"{k}={meta[k]}" for k in ("BM", "BN", "BLOCK") if k in meta)
                label = (f"{launch.name} {desc} {tile} warps={config.num_warps} stages={config.num_stages}"
                         + (f" pos={pos}" if uses_pos else ""))
                yield label, launch, config, spec


def compile_variant(launch: Launch, spec: tuple, target):
    import triton
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = spec
    return triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def _tool(name: str, *args: str) -> str:
    path = os.path.join(TOOLS, name)
    if not os.access(path, os.X_OK):
        return ""
    return subprocess.run([path, *args], capture_output=True, text=True).stdout


def sass_report(kernel) -> str:
    """Registers, stack, spill instructions and tensor-core instructions of the cubin ('' without cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = re.search(r"REG:(\d+) STACK:(\d+)", _tool("cuobjdump", "--dump-resource-usage", f.name))
        sass = _tool("cuobjdump", "-sass", f.name)
    if not usage:
        return ""
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", sass, re.M)
    count = {op: ops.count(op) for op in ("HGMMA", "HMMA", "LDL", "STL")}
    return (f" regs={usage[1]} stack={usage[2]}B spill_ld={count['LDL']} spill_st={count['STL']}"
            f" wgmma={count['HGMMA']} mma_sync={count['HMMA']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200, 80: A100)")
    ap.add_argument("--quick", action="store_true", help="only the first autotune tile of each kernel")
    ap.add_argument("--match", action="append", default=[], metavar="TEXT",
                    help="only variants whose label contains TEXT (repeatable: all must match), e.g. '_dq bf16'")
    args = ap.parse_args(argv)
    if interpreting():
        print("aot_check: error: TRITON_INTERPRET=1 is set; unset it to compile the kernels", file=sys.stderr)
        return 2
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", args.arch, 32)
    n = 0
    t0 = time.monotonic()
    for label, launch, _config, spec in variants(args.quick, target):
        if not all(m in label for m in args.match):
            continue
        try:
            kernel = compile_variant(launch, spec, target)
        except Exception as e:  # the compiler's own message names the line; keep its first lines
            msg = "\n  ".join(str(e).strip().splitlines()[:12])
            print(f"aot_check: error: sm_{args.arch} {label}: {type(e).__name__}: {msg}", file=sys.stderr)
            return 1
        print(f"ok sm_{args.arch} {label} shared={kernel.metadata.shared}B{sass_report(kernel)}", flush=True)
        n += 1
    if n == 0:
        print(f"aot_check: error: no kernel variant matches {args.match}", file=sys.stderr)
        return 2
    print(f"compiled {n} kernel variants for sm_{args.arch} in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
