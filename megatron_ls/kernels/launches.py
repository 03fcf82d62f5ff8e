"""The fused kernels' launches, recorded instead of run: what aot_check compiles and kernel_work counts.

The host code (long_short_forward / long_short_backward, bias_gelu) runs unchanged on meta tensors inside
`recorded_launches()`; each `kernel[grid](...)` is captured with its grid, arguments and autotune candidates
instead of being executed. `Launch.specialise` then builds the signature, constexprs and `attrs` exactly as
Triton's JIT does at a launch (its own binder: 16-byte divisibility hints on pointers and integers divisible
by 16, integers equal to 1 as constants), so the ahead-of-time compile is the code a GPU would run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from megatron_ls.kernels.spec import LongShortGeometry, landmark_distance_rows


@dataclass
class Launch:
    """One `kernel[grid](*args, **kwargs)` of the host code."""

    fn: object  # the innermost triton JITFunction
    configs: list  # autotune candidates (one pseudo-config when not autotuned)
    heuristics: dict  # @triton.heuristics rules, applied in order
    grid: object  # tuple or callable(meta) -> tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.fn.__name__

    def meta(self, config) -> dict:
        """Every named argument of the kernel for `config`: the call's, the config's, then the heuristics'."""
        meta = {**dict(zip(self.fn.arg_names, self.args)), **self.kwargs, **config.kwargs}
        for key, rule in self.heuristics.items():
            meta[key] = rule(meta)
        return meta

    def grid_for(self, config) -> tuple[int, ...]:
        grid = self.grid(self.meta(config)) if callable(self.grid) else self.grid
        return tuple(grid) + (1,) * (3 - len(grid))

    def call_kwargs(self, config) -> dict:
        meta = self.meta(config)
        extra = {k: v for k, v in meta.items() if k not in self.fn.arg_names[:len(self.args)]}
        return {**extra, **config.all_kwargs()}

    def specialise(self, config, target):
        """(signature, constexprs, attrs, options) as triton.runtime.jit.JITFunction.run builds them."""
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(target)
        binder = create_function_from_signature(self.fn.signature, self.fn.params, backend)
        kwargs = self.call_kwargs(config)
        bound_args, specialization, options = binder(*self.args, **kwargs)
        options, signature, constexprs, attrs = self.fn._pack_args(backend, kwargs, bound_args, specialization,
                                                                   options)
        return signature, constexprs, attrs, options


def _unwrap(kernel) -> tuple[object, list, dict]:
    """(jit function, autotune configs, heuristics) of @autotune(@heuristics(@jit)) or a bare @jit; the jit
    function is a JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1."""
    import triton

    configs, heuristics = None, {}
    while hasattr(kernel, "configs") or hasattr(kernel, "values"):
        if hasattr(kernel, "configs"):
            configs = kernel.configs
        if hasattr(kernel, "values"):
            heuristics = kernel.values
        kernel = kernel.fn
    return kernel, configs or [triton.Config({})], heuristics


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Within the block, Triton kernel launches are appended to the yielded list and not executed."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def record(self, *args, grid, warmup=False, **kwargs):
        fn, configs, heuristics = _unwrap(self)
        launches.append(Launch(fn, configs, heuristics, grid, args, kwargs))

    saved = Autotuner.run, JITFunction.run, InterpretedFunction.run
    Autotuner.run = lambda self, *args, **kwargs: record(self, *args, **kwargs)
    JITFunction.run = InterpretedFunction.run = record
    try:
        yield launches
    finally:
        Autotuner.run, JITFunction.run, InterpretedFunction.run = saved


@dataclass(frozen=True)
class CoreGeometry:
    """The long-short core's shapes: batch, heads, segment, memory, head dim, window, chunk, rank, clamp."""

    B: int
    H: int
    N: int
    M: int
    dh: int
    w: int
    c: int
    r: int
    clamp: int | None = None
    landmarks: bool = True

    @property
    def P(self) -> int:
        return min(self.M, self.w - 1)

    @property
    def L(self) -> int:
        return (self.M + self.N) // self.c * self.r if self.landmarks else 0

    @property
    def n_dist(self) -> int:
        return landmark_distance_rows((self.M + self.N) // self.c, self.clamp)

    def inputs(self, dtype: torch.dtype, device: str | torch.device = "meta") -> list[torch.Tensor]:
        """Zero-filled (or meta) q, k_win, v_win, k_lm, v_lm, u, v, R_w, R_c of this geometry, requiring grad, laid
        out as the attention layer passes them: q a (B, H, N, dh) view of its (B, N, H, dh) projection, each k and
        v a view of one half of [k | v] rows, (B, L, 2, H, dh)."""
        B, H, N, dh = self.B, self.H, self.N, self.dh

        def zeros(*shape):
            return torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)

        q = zeros(B, N, H, dh).transpose(1, 2)
        win, lm = zeros(B, self.P + N, 2, H, dh), zeros(B, self.L, 2, H, dh)
        kv = [t[:, :, j].transpose(1, 2) for t in (win, lm) for j in (0, 1)]
        return [q, *kv, zeros(H, dh), zeros(H, dh), zeros(H, self.w, dh), zeros(H, self.n_dist, dh)]

    def spec(self) -> LongShortGeometry:
        return LongShortGeometry(self.w, self.c, self.r, self.M)
