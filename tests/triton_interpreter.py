"""Instruments for Triton's interpreter (TRITON_INTERPRET=1) used by the kernel tests.

`executed_work()` counts what the kernels actually execute, per kernel: every tl.dot's (M, N, K), the bytes of
unmasked loads and stores, the unmasked elements of atomic adds (the same three figures that
megatron_ls.kernels.work computes from the launches).

`bf16_emulation()` makes the interpreter compute bf16 as a GPU does. Triton 3.9's interpreter stores bf16 as
its uint16 bit patterns and multiplies those integers in tl.dot (a 16 x 16 product comes out ~5e9 off), and
rounds fp32 -> bf16 by truncation. Under the emulation a bf16 tl.dot multiplies the exact bf16 values and
accumulates in fp32 (as the tensor cores), casts to bf16 round to nearest even (cvt.rn.bf16.f32), and any
other arithmetic on bf16 data raises instead of silently computing on bit patterns. The kernel's own
rounding points (its loads, its .to(bf16) casts, its stores) then run as written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from megatron_ls.kernels.work import Work


def _patch(obj, name: str, make_wrapper, saved: list) -> None:
    original = getattr(obj, name)
    saved.append((obj, name, original))
    setattr(obj, name, make_wrapper(original))


@contextlib.contextmanager
def executed_work() -> Iterator[dict[str, Work]]:
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    work: dict[str, Work] = {}
    current: list[str] = []
    saved: list = []

    def bytes_of(ptrs, mask) -> int:
        return int(mask.data.sum()) * (ptrs.get_element_ty().primitive_bitwidth // 8)

    def run(original):
        def wrapper(self, *args, **kwargs):
            current.append(self.fn.__name__)
            work.setdefault(self.fn.__name__, Work())
            try:
                return original(self, *args, **kwargs)
            finally:
                current.pop()
        return wrapper

    def dot(original):
        def wrapper(a, b, d, *args):
            (m, k), n = a.data.shape, b.data.shape[1]
            work[current[-1]].dots[(m, n, k)] += 1
            return original(a, b, d, *args)
        return wrapper

    def load(original):
        def wrapper(ptrs, mask, *args):
            work[current[-1]].bytes += bytes_of(ptrs, mask)
            return original(ptrs, mask, *args)
        return wrapper

    def store(original):
        def wrapper(ptrs, value, mask, *args):
            work[current[-1]].bytes += bytes_of(ptrs, mask)
            return original(ptrs, value, mask, *args)
        return wrapper

    def atomic(original):
        def wrapper(op, ptr, val, mask, *args):
            work[current[-1]].atomics += int(mask.data.sum())
            return original(op, ptr, val, mask, *args)
        return wrapper

    _patch(interpreter.InterpretedFunction, "run", run, saved)
    _patch(builder, "create_dot", dot, saved)
    _patch(builder, "create_masked_load", load, saved)
    _patch(builder, "create_masked_store", store, saved)
    _patch(builder, "create_atomic_rmw", atomic, saved)
    try:
        yield work
    finally:
        for obj, name, original in reversed(saved):
            setattr(obj, name, original)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as cvt.rn.bf16.f32 (finite inputs)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


@contextlib.contextmanager
def bf16_emulation() -> Iterator[None]:
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    TensorHandle = interpreter.TensorHandle
    saved: list = []

    def is_bf16(h) -> bool:
        return h.dtype.scalar == tl.bfloat16

    def dot(original):
        def wrapper(a, b, d, *args):
            if not (is_bf16(a) or is_bf16(b)):
                return original(a, b, d, *args)
            assert is_bf16(a) and is_bf16(b) and d.dtype.scalar == tl.float32, "bf16 dot: mixed operand types"
            out = np.matmul(bf16_to_f32(a.data), bf16_to_f32(b.data), dtype=np.float32) + d.data
            return TensorHandle(out.astype(np.float32), tl.float32)
        return wrapper

    def cast(original):
        def wrapper(src, dst_type):
            src_t, dst_t = src.dtype.scalar, dst_type.scalar
            if src_t == tl.float32 and dst_t == tl.bfloat16:
                return TensorHandle(f32_to_bf16(src.data), tl.bfloat16)
            if src_t == tl.bfloat16 and dst_t == tl.float32:
                return TensorHandle(bf16_to_f32(src.data), tl.float32)
            assert not (is_bf16(src) or dst_t == tl.bfloat16), f"unemulated bf16 cast {src_t} -> {dst_t}"
            return original(src, dst_type)
        return wrapper

    def binary(original):
        def wrapper(lhs, rhs, op):
            assert not (is_bf16(lhs) or is_bf16(rhs)), f"arithmetic on bf16 bit patterns: {op.__name__}"
            return original(lhs, rhs, op)
        return wrapper

    _patch(builder, "create_dot", dot, saved)
    _patch(builder, "cast_impl", cast, saved)
    _patch(builder, "binary_op", binary, saved)
    try:
        yield
    finally:
        for obj, name, original in reversed(saved):
            setattr(obj, name, original)
