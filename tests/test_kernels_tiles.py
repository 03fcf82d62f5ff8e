"""Every CUDA autotune tile of the fused kernels, run on the CPU under Triton's interpreter.

The interpreter normally uses one 16 x 16 tile; the GPU autotunes over the tiles of
megatron_ls/kernels/triton_setup.py (64 x 32, 16 x 64, ...), whose loop bounds, band widths and
ragged edges differ. MEGATRON_LS_TRITON_CONFIG=i selects tile i of every kernel at import, so each
index runs the fp32 interpreter cases of test_kernels_fused.py (both window-position modes) in a fresh process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the fused kernels are written in Triton")

from megatron_ls.kernels.triton_setup import _TILES  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TILES = max(len(t) for t in _TILES.values())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tile", range(N_TILES))
def test_each_cuda_tile_matches_reference_in_the_interpreter(tile):
    env = dict(os.environ, TRITON_INTERPRET="1", MEGATRON_LS_TRITON_CONFIG=str(tile), CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_fused.py",
                          "-k", "fp32_matches_reference and (multi_block or clamped or rank3)"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=560)
    assert res.returncode == 0, res.stdout[-4000:]
    assert re.search(r"^8 passed", res.stdout, re.M), res.stdout[-1000:]  # 4 cases x (band, table); a skip shows
