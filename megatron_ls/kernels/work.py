"""Work account of the fused attention kernels: what each launch issues, counted from the launch itself.

For a recorded launch (megatron_ls.kernels.launches) and one of its autotune tiles, `launch_work` walks the
grid's programs with the kernels' own loop-bound and band functions (ls_tiles, evaluated in Python) and
the tile's constexprs (triton_setup's heuristics), and adds up per program what the kernel body issues:

- dots: every tl.dot as (M, N, K) -> how many, masked and padded work included (tensor-core FLOPs 2 M N K);
- bytes: global loads and stores, unmasked elements times the element size (L2 hits included);
- atomics: unmasked elements of the atomic adds.

Each kernel's body is mirrored by one function below; tests/kernels/test_kernels_fused.py runs the kernels under
Triton's interpreter, counts the same three things as executed, and requires equality for every tile.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from megatron_ls.kernels import ls_tiles


@dataclass
class Work:
    dots: Counter = field(default_factory=Counter)  # (M, N, K) -> count
    bytes: int = 0
    atomics: int = 0

    @property
    def flops(self) -> int:
        return sum(2 * m * n * k * count for (m, n, k), count in self.dots.items())

    def __iadd__(self, other: Work) -> Work:
        self.dots.update(other.dots)
        self.bytes += other.bytes
        self.atomics += other.atomics
        return self

    def scaled(self, times: int) -> Work:
        return Work(Counter({k: v * times for k, v in self.dots.items()}), self.bytes * times, self.atomics * times)


def _size(t) -> int:
    return t.element_size()


def _rows(start: int, count: int, end: int) -> int:
    """Rows start .. start+count-1 below end (a load_rows mask)."""
    return max(0, min(start + count, end) - start)


def _window_visible(i0: int, bm: int, s0: int, bn: int, P: int, W: int, N: int) -> int:
    """Pairs of tile (queries i0.., keys s0..) with 0 <= P + i - s < W and i < N: the kernels' window mask."""
    i = np.arange(i0, min(i0 + bm, N))
    lo = np.maximum(P + i - W + 1, s0)
    hi = np.minimum(P + i, s0 + bn - 1)
    return int(np.maximum(hi - lo + 1, 0).sum())


def _fwd(m: dict, pid: int) -> Work:
    BM, BN, DH, N, P, M, L, W, C, R = (m[k] for k in ("BM", "BN", "DH", "N", "P", "M", "L", "W", "C", "R"))
    it, S = _size(m["Q"]), P + N
    w = Work()
    i0 = pid * BM
    rq = _rows(i0, BM, N)
    w.bytes += rq * DH * it
    if m["HAS_LM"]:
        for l0 in range(0, ls_tiles.landmark_count.fn(i0, M, N, C, R, BM), m["LSTEP"]):
            w.bytes += 2 * _rows(l0, BN, min(l0 + m["LSTEP"], L)) * DH * it + m["NDL"] * DH * _size(m["RL"])
            w.dots.update([(BM, m["NDL"], DH), (BM, BN, DH), (BM, DH, BN)])
    for s0 in range(*ls_tiles.window_key_range.fn(i0, P, W, S, BM, BN), BN):
        w.bytes += _rows(s0, BN, S) * (2 * DH * it + _size(m["UK"]))
        if m["POS_TABLE"]:
            w.bytes += _window_visible(i0, BM, s0, BN, P, W, N) * (_size(m["QR"]) + _size(m["VR"]))
        else:
            w.bytes += m["NDW"] * (DH * _size(m["RW"]) + _size(m["VR"]))
            w.dots[(BM, m["NDW"], DH)] += 1
        w.dots.update([(BM, BN, DH), (BM, DH, BN)])
    w.bytes += rq * (DH * _size(m["OUT"]) * (2 if m["HAS_LO"] else 1) + _size(m["LSE"]))
    return w


def _delta(m: dict, pid: int) -> Work:
    rows = _rows(pid * m["BR"], m["BR"], m["N"])
    out = _size(m["OUT"]) * (2 if m["HAS_LO"] else 1)
    return Work(bytes=rows * (m["DH"] * (out + _size(m["DO"])) + _size(m["DELTA"])))


def _key_bias(m: dict, pid: int) -> Work:
    rows = _rows(pid * m["BR"], m["BR"], m["S"])
    return Work(bytes=rows * (m["DH"] * _size(m["KW"]) + _size(m["UK"])) + m["DH"] * _size(m["U"]))


def _query_side_bytes(m: dict, rq: int) -> int:
    """q, dO, log-sum-exp and delta of rq query rows (_query_side)."""
    return rq * (m["DH"] * (_size(m["Q"]) + _size(m["DO"])) + _size(m["LSE"]) + _size(m["DELTA"]))


def _bwd_window(m: dict, pid: int) -> Work:
    BM, BN, DH, N, P, W = (m[k] for k in ("BM", "BN", "DH", "N", "P", "W"))
    it, S, NDW = _size(m["Q"]), P + N, m["NDW"]
    w = Work()
    s0 = pid * BN
    rs = _rows(s0, BN, S)
    w.bytes += rs * (2 * DH * it + _size(m["UK"])) + (0 if m["POS_TABLE"] else DH * _size(m["V"]))
    for i0 in range(*ls_tiles.window_query_range.fn(s0, P, W, N, BM, BN), BM):
        rq = _rows(i0, BM, N)
        w.bytes += _query_side_bytes(m, rq)
        w.dots.update([(BN, BM, DH)] * 2 + [(BN, DH, BM)] * 2 + [(BM, DH, BN)])  # scores, dP; dV, dK; dQ
        if m["POS_TABLE"]:  # QR and v.R_w loaded, dS stored, at the visible pairs
            w.bytes += _window_visible(i0, BM, s0, BN, P, W, N) * (2 * _size(m["QR"]) + _size(m["VR"]))
        else:
            w.bytes += NDW * (DH * _size(m["RW"]) + _size(m["VR"]))
            w.dots.update([(NDW, BM, DH), (BM, DH, NDW), (NDW, DH, BM)])  # band, its dQ and dR
            band = ls_tiles.window_band_start.fn(i0, s0, P, BN) + np.arange(NDW)
            w.atomics += int(((band >= 0) & (band < W)).sum()) * DH
        w.atomics += rq * DH
    w.bytes += 3 * rs * DH * it + DH * (_size(m["U"]) + 2 * _size(m["DBIAS"]))  # dK, dV stored, K again; u
    return w


def _bwd_landmark(m: dict, pid: int) -> Work:
    BM, BN, DH, N, M, L, C, R = (m[k] for k in ("BM", "BN", "DH", "N", "M", "L", "C", "R"))
    it, NDL, LSTEP = _size(m["Q"]), m["NDL"], m["LSTEP"]
    w = Work()
    l0 = pid * LSTEP
    rl = _rows(l0, BN, min(l0 + LSTEP, L))
    w.bytes += 2 * rl * DH * it
    for i0 in range(ls_tiles.landmark_query_start.fn(l0, M, C, R, BM), N, BM):
        rq = _rows(i0, BM, N)
        w.bytes += _query_side_bytes(m, rq) + NDL * DH * _size(m["RL"])
        w.dots.update([(NDL, BM, DH)] + [(BN, BM, DH)] * 2 + [(BN, DH, BM)] * 2 + [(BM, DH, BN), (BM, DH, NDL),
                                                                                  (NDL, DH, BM)])
        # band, scores, dP, dV, dK, dQ, band dQ, dR
        dlo = ls_tiles.landmark_band_start.fn(i0, l0, M, C, R, LSTEP)
        w.atomics += rq * DH + max(0, NDL - max(0, -dlo)) * DH
    w.bytes += 2 * rl * DH * it
    return w


def unique_bytes(launch) -> int:
    """Bytes of the distinct tensors a launch reads or writes: its HBM traffic when every re-read (K/V, R rows
    and table entries shared by neighbouring tiles) hits the L2 cache."""
    import torch

    seen = {id(t): t for t in launch.args if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in seen.values())


KERNELS = {"_fwd_kernel": _fwd, "_delta_kernel": _delta, "_key_bias_kernel": _key_bias,
           "_bwd_window_kernel": _bwd_window, "_bwd_landmark_kernel": _bwd_landmark}


def launch_work(launch, config=None) -> Work:
    """What `launch` issues with `config` (default: its first autotune candidate), all programs together."""
    config = config or launch.configs[0]
    body = KERNELS[launch.name]
    meta = launch.meta(config)
    grid = launch.grid_for(config)
    total = Work()
    for pid in range(grid[0]):
        total += body(meta, pid)
    return total.scaled(grid[1] * grid[2])  # every batch x head does the same work


_ALLOCATIONS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}
_WRITE_ONLY = {"zero_", "fill_", "copy_", "zeros", "zeros_like", "new_zeros", "ones", "ones_like", "new_ones", "full",
               "full_like", "new_full"}


class TorchOpWork:
    """A TorchDispatchMode that accounts the torch ops run inside it (meta tensors work) as Work: each matrix
    product (mm, addmm, bmm, baddbmm) as dots, and as bytes every tensor an op reads plus every tensor it writes
    (views and allocations cost nothing; zero_/fill_/copy_ read nothing but their source)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer._account(func, args, kwargs or {}, out)
                return out

        self.mode = _Mode()
        self.work = Work()

    def __enter__(self) -> Work:
        self.mode.__enter__()
        return self.work

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)

    def _account(self, func, args, kwargs, out) -> None:
        import torch
        from torch.utils._pytree import tree_leaves

        name = func._schema.name.split("::")[-1]
        if func.is_view or name in _ALLOCATIONS or name in ("detach", "alias", "lift_fresh", "_unsafe_view"):
            return
        reads = (args, {k: v for k, v in kwargs.items() if k != "out"})  # out= is written, not read
        tensors_in = [t for t in tree_leaves(reads) if isinstance(t, torch.Tensor)]
        if name in _WRITE_ONLY:
            tensors_in = tensors_in[1:] if name == "copy_" else []
        if name.rstrip("_") in ("addmm", "baddbmm") and kwargs.get("beta", 1) == 0:
            tensors_in = tensors_in[1:]  # beta = 0: the input is not read
        tensors_out = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.work.bytes += sum(t.numel() * t.element_size() for t in tensors_in + tensors_out)
        a, b = {"mm": (0, 1), "addmm": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2)}.get(name.rstrip("_"), (None, None))
        if a is not None:
            x, y = args[a], args[b]
            batch = x.shape[0] if x.dim() == 3 else 1
            self.work.dots[(x.shape[-2], y.shape[-1], x.shape[-1])] += batch
