"""Instruments for Triton's interpreter (TRITON_INTERPRET=1) used by the kernel tests.

`executed_work()` counts what the kernels actually execute, per kernel: every tl.dot's (M, N, K), the bytes of
unmasked loads and stores, the unmasked elements of atomic adds (the same three figures that
megatron_ls.kernels.work computes from the launches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
