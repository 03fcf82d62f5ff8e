"""Geometry and strided views of the blocked long-short core (attention/blocked.py, blocked_core.py).

Queries are cut into blocks of b positions (b a multiple of the chunk c), keys into blocks of b too, both
block-major: (blocks, B*H, b, dh). Query block s sees the L = W + b keys of key blocks s .. s + shifts
(W = shifts * b >= w - 1): its "tile". One group of g query blocks keeps ONE score buffer

    S (g, B*H, rows, R),  row = [ n_vis landmark scores | L window-tile scores ],  R = n_vis + L

so that a single softmax covers both parts with no concatenation, and every matmul writes its piece of S
in place. The pieces that are not a plain block of S are strided views of it (no copies):

- the window band: row ii of a tile sees tile columns ii + off .. ii + off + w - 1 (off = W - w + 1), one
  per distance w - 1 .. 0, so the relative-position term (q + v) . R_w(d) is a matmul straight into the
  view with row stride R + 1 (the Transformer-XL skew, without its pad-and-copy);
- the landmark distance term: a query of chunk Q sees landmark chunks j < Q at distance Q - 1 - j; with
  the distance table reversed, rows of one chunk read one contiguous slice of q . R_c, shifted by one
  column per chunk: an as_strided view that adds it in one pass (and writes its gradient back in one).

Only the masked corners are filled: the two triangles of each tile outside the band, the few landmark
columns each chunk of a block cannot see yet, and key positions before the stream start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_ls.model.attention.common import neg_value


def default_block_size(window: int, seq_len: int, chunk: int = 1) -> int:
    """Query block b: about w / 4 (the tile is then 1.25 w keys wide per query, with matmuls still big enough
    to run well on CPU; measured with bench/attention.py), a multiple of the chunk, at most the segment."""
    b = window // 4 if window >= 256 else window // 2 if window >= 64 else window
    b = max(chunk, b // chunk * chunk)
    return min(b, max(chunk, seq_len // chunk * chunk))


@dataclass(frozen=True)
class Group:
    """Query blocks s0 .. s0 + g - 1, each of `rows` queries (b, or fewer for the last, partial block)."""

    s0: int
    g: int
    rows: int
    q0: int  # landmark chunks visible to the group's first query
    qmax: int  # landmark chunks visible to its last query (0 = no landmark scores in this group)


@dataclass(frozen=True)
class Geometry:
    B: int
    H: int
    N: int
    dh: int
    mem_len: int
    w: int
    c: int
    r: int
    b: int
    shifts: int
    n_lm: int
    n_dist: int  # rows of the landmark distance table as given (the last one clamps)
    D: int  # landmark distances used: 0 .. D - 1
    scale: float
    dropout_p: float
    neg: float
    groups: tuple[Group, ...]

    @property
    def BH(self) -> int:
        return self.B * self.H

    @property
    def W(self) -> int:
        return self.shifts * self.b

    @property
    def L(self) -> int:
        return self.W + self.b

    @property
    def off(self) -> int:
        return self.W - self.w + 1

    @property
    def P(self) -> int:
        return min(self.mem_len, self.w - 1)

    @property
    def front(self) -> int:
        """Key rows before the first real key in block-major key order (masked)."""
        return self.W - self.P

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.N / self.b)

    @property
    def nqc(self) -> int:
        """Chunks per full query block."""
        return self.b // self.c


# Default bound on one group's score elements (B * H * rows * (landmarks + tile) per block): 8 MiB of fp32 scores,
# a few blocks that stay in the CPU's cache between the score matmuls, the softmax and the value matmuls (at
# N = M = 4096 the core ran 8-9% faster than with 2^23, and as fast as with 2^20 or 2^19; bench/attention.py).
MAX_SCORES = 1 << 21


@dataclass(frozen=True)
class Tiling:
    """How a segment is cut: block size, key blocks before each query block, groups (shapes only)."""

    b: int
    shifts: int
    groups: tuple[Group, ...]

    @property
    def L(self) -> int:
        return (self.shifts + 1) * self.b


def tiling(B: int, H: int, N: int, mem_len: int, *, window: int, chunk: int, n_lm: int,
           block_size: int | None = None, max_scores: int = MAX_SCORES) -> Tiling:
    """Blocks of b queries (a multiple of the chunk), grouped so that a group's scores stay under `max_scores`."""
    b = block_size or default_block_size(window, N, chunk)
    if b % chunk:
        raise ValueError(f"block_size ({b}) must be a multiple of chunk ({chunk})")
    shifts = math.ceil((window - 1) / b)
    per_block = B * H * b * ((shifts + 1) * b + n_lm)
    g_max = max(1, min(N // b or 1, max_scores // max(per_block, 1)))
    full = N // b
    groups = [_group(s0, min(g_max, full - s0), b, b, mem_len, chunk, n_lm) for s0 in range(0, full, g_max)]
    if N % b:
        groups.append(_group(full, 1, N % b, b, mem_len, chunk, n_lm))
    return Tiling(b=b, shifts=shifts, groups=tuple(groups))


def make_geometry(q: torch.Tensor, n_lm: int, n_dist: int, *, window: int, chunk: int, chunk_rank: int, mem_len: int,
                  dropout_p: float, softmax_scale: float | None, block_size: int | None, max_scores: int) -> Geometry:
    B, H, N, dh = q.shape
    t = tiling(B, H, N, mem_len, window=window, chunk=chunk, n_lm=n_lm, block_size=block_size,
               max_scores=max_scores)
    return Geometry(B=B, H=H, N=N, dh=dh, mem_len=mem_len, w=window, c=chunk, r=chunk_rank, b=t.b, shifts=t.shifts,
                    n_lm=n_lm, n_dist=n_dist, D=(mem_len + N - 1) // chunk if n_lm else 0,
                    scale=softmax_scale if softmax_scale is not None else dh ** -0.5, dropout_p=dropout_p,
                    neg=neg_value(q.dtype), groups=t.groups)


def _group(s0: int, g: int, rows: int, b: int, mem_len: int, chunk: int, n_lm: int) -> Group:
    first = mem_len + s0 * b
    last = first + (g - 1) * b + rows - 1
    return Group(s0=s0, g=g, rows=rows, q0=first // chunk if n_lm else 0, qmax=last // chunk if n_lm else 0)


def band(S: torch.Tensor, geo: Geometry, grp: Group, n_vis: int) -> torch.Tensor:
    """(g * BH, rows, w) view of the window band of a score buffer S (g, BH, rows, R); column e = distance w-1-e."""
    R = S.shape[-1]
    return S.as_strided((grp.g * geo.BH, grp.rows, geo.w), (grp.rows * R, R + 1, 1),
                        S.storage_offset() + n_vis + geo.off)


def landmark_view(S: torch.Tensor, geo: Geometry, grp: Group) -> torch.Tensor:
    """(g, BH, chunks per block, c, qmax, r) view of the landmark scores of S (g, BH, rows, R)."""
    R = S.shape[-1]
    r, c = geo.r, geo.c
    return S.as_strided((grp.g, geo.BH, grp.rows // c, c, grp.qmax, r),
                        (geo.BH * grp.rows * R, grp.rows * R, c * R, R, r, 1), S.storage_offset())


def distance_skew(A: torch.Tensor, geo: Geometry, grp: Group, width: int, repeat: int) -> torch.Tensor:
    """View of A (g, BH, rows, width) that shows row i's slice starting at column qmax - Q_i (Q_i: landmark chunks
    visible to row i) as (g, BH, chunks per block, c, qmax, repeat), each column `repeat` times (stride 0): with
    repeat = r, the layout of `landmark_view`.

    A = q . R_c reversed (column e = distance qmax - 1 - e, width = qmax) turns into the distance term of every
    landmark score; the columns a row cannot see read the next row (masked afterwards). With width 2 qmax - q0 the
    same view is where the gradient of landmark scores lands in a distance-ordered buffer (every row in bounds).
    """
    c, nqc = geo.c, geo.nqc
    return A.as_strided((grp.g, geo.BH, grp.rows // c, c, grp.qmax, repeat),
                        (geo.BH * grp.rows * width - nqc, grp.rows * width, c * width - 1, width, 1, 0),
                        A.storage_offset() + grp.qmax - grp.q0)


@dataclass(frozen=True)
class Masks:
    """Boolean masks (True = masked) of the tile corners and of the landmark staircase, built once per call."""

    left: torch.Tensor  # (b, off + b - 1): tile column j < ii + off
    right: torch.Tensor  # (b, b - 1): tile column off + w + j >= ii + off + w  <=>  j >= ii

    @staticmethod
    def build(geo: Geometry, device: torch.device) -> Masks:
        ii = torch.arange(geo.b, device=device)[:, None]
        left = torch.arange(geo.off + geo.b - 1, device=device)[None, :] < ii + geo.off
        right = torch.arange(geo.b - 1, device=device)[None, :] >= ii
        return Masks(left=left, right=right)


def staircase(geo: Geometry, grp: Group, device: torch.device) -> torch.Tensor:
    """(g, 1, rows, (qmax - q0) r) mask of landmark columns q0 r .. qmax r - 1 that row i cannot see yet."""
    gi = torch.arange(grp.g, device=device)[:, None, None, None]
    ii = torch.arange(grp.rows, device=device)[None, None, :, None]
    col = torch.arange((grp.qmax - grp.q0) * geo.r, device=device)[None, None, None, :]
    return col // geo.r >= gi * geo.nqc + ii // geo.c


def mask_tile(S: torch.Tensor, geo: Geometry, grp: Group, n_vis: int, masks: Masks) -> None:
    """Fill the tile columns of S that no query of their row sees: band corners and keys before the stream."""
    rows, off, w, b = grp.rows, geo.off, geo.w, geo.b
    S[..., n_vis: n_vis + off + rows - 1].masked_fill_(masks.left[:rows, : off + rows - 1], geo.neg)
    S[..., n_vis + off + w: n_vis + geo.L].masked_fill_(masks.right[:rows], geo.neg)
    for gi in range(grp.g):
        before = geo.front - (grp.s0 + gi) * b
        if before <= 0:
            break
        S[gi, ..., n_vis: n_vis + before].fill_(geo.neg)
