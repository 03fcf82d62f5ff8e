"""Every CUDA autotune tile of the fused kernels, run on the CPU under Triton's interpreter.

The interpreter normally uses one 16 x 16 tile; the GPU autotunes over the tiles of
megatron_ls/kernels/triton_setup.py (64 x 64), whose loop bounds, band widths and ragged edges differ.
MEGATRON_LS_TRITON_CONFIG=i selects tile i of every kernel at import, so each distinct tile runs the fp32
interpreter cases of test_kernels_fused.py and its work-account check (both window-position modes) in a
fresh process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the fused kernels are written in Triton")

from repo_paths import REPO_ROOT

from megatron_ls.kernels.triton_setup import _TILES  # noqa: E402

ROOT = REPO_ROOT
# One run per distinct (BM, BN) among the candidates (warps and stages do not change the index arithmetic):
# MEGATRON_LS_TRITON_CONFIG=i picks candidate i of every kernel (the last one where a kernel has fewer).
_PICKS = {tuple(tiles[min(i, len(tiles) - 1)][:2] for tiles in _TILES.values()): i
          for i in reversed(range(max(len(t) for t in _TILES.values())))}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tile", sorted(_PICKS.values()))
def test_each_cuda_tile_matches_reference_in_the_interpreter(tile):
    env = dict(os.environ, TRITON_INTERPRET="1", MEGATRON_LS_TRITON_CONFIG=str(tile), CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/kernels/test_kernels_fused.py", "-k",
                          "(fp32_matches_reference and (multi_block or clamped or rank3)) or work_account"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=560)
    assert res.returncode == 0, res.stdout[-4000:]
    # (4 reference cases + 4 work-account cases) x (band, table); a skip would show
    assert re.search(r"^16 passed", res.stdout, re.M), res.stdout[-1000:]


@pytest.mark.parametrize("kernel", sorted(_TILES))
@pytest.mark.parametrize("c,r", [(16, 1), (16, 4), (8, 2), (4, 3), (128, 8), (2, 1), (12, 1), (16, 32)])
def test_landmark_band_holds_every_distance_of_a_tile(kernel, c, r):
    """Brute force over query and landmark block offsets: the distances of the LSTEP landmarks a tile owns lie in
    [dlo, dlo + NDL), dlo as the kernels compute it, so the band and its gather never miss a row. The memory
    length is a multiple of c (the contract), which the band sizes rely on."""
    from megatron_ls.kernels.triton_setup import BAND_SIZES

    for bm, bn, _, _ in _TILES[kernel] + [(16, 16, 1, 1)]:  # + the interpreter's tile
        meta = {"BM": bm, "BN": bn, "C": c, "R": r}
        for name, rule in BAND_SIZES.items():
            meta[name] = rule(meta)
        ndl, step = meta["NDL"], meta["LSTEP"]
        assert 1 <= step <= bn and ndl >= 16 and ndl & (ndl - 1) == 0
        for m in (0, c, 3 * c):  # memory length shifts the queries' chunks
            for i0 in range(0, 4 * bm, bm):
                for l0 in range(0, 6 * step, step):
                    dlo = (m + i0) // c - 1 - (l0 + step - 1) // r
                    dists = {(m + i) // c - 1 - j // r for i in range(i0, i0 + bm) for j in range(l0, l0 + step)}
                    assert dlo <= min(dists) and max(dists) < dlo + ndl, (bm, bn, m, i0, l0)
