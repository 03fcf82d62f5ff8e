"""bench/core_ab.py: the side-by-side comparison of two checkouts' blocked cores."""

import os

import pytest

from bench.core_ab import compare, load_core

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_core_against_its_own_file_is_bitwise_equal_and_timed():
    row = compare(load_core(ROOT), 96, rounds=2, heads=2, dh=8, w=32, c=4)
    assert row["bitwise_equal"] and row["this_ms"] > 0 and row["other_ms"] > 0


def test_a_checkout_without_the_core_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no megatron_ls/model/attention/blocked_core.py under"):
        load_core(str(tmp_path))
