"""The stream (lane) dataset: disjoint ranks, no token read twice or skipped, exact resume."""

import numpy as np
import pytest
import torch

from megatron_ls.data import LaneDataset, load_split, split_micro_batches
from megatron_ls.data.preprocess import preprocess_text


def _tokens(n):
    # Distinct values so that every position can be identified from what was read.
    return np.arange(n, dtype=np.int64)


@pytest.mark.parametrize("total, G, N, dp", [(1000, 4, 7, 2), (4099, 8, 16, 4), (777, 6, 5, 3), (100, 1, 9, 1)])
def test_epoch_covers_every_lane_once_across_ranks(total, G, N, dp):
    tokens = _tokens(total)
    ranks = [LaneDataset(tokens, G, N, r, dp) for r in range(dp)]
    L = total // G
    S = ranks[0].steps_per_epoch
    assert S == (L - 1) // N
    seen_inputs, seen_targets = [], []
    for step in range(S):
        for ds in ranks:
            x, y = ds.next_batch()
            assert x.dtype == torch.int64 and x.shape == (G // dp, N) == y.shape
            assert torch.equal(y, x + 1)  # targets are the inputs shifted by one token
            assert ds.is_new_stream == (step == 0)
            seen_inputs.append(x.reshape(-1).numpy())
            seen_targets.append(y.reshape(-1).numpy())
    inputs = np.concatenate(seen_inputs)
    assert len(np.unique(inputs)) == len(inputs), "a token was read twice"
    # Exactly the first S*N tokens of every lane, nothing skipped in between.
    expected = np.concatenate([np.arange(g * L, g * L + S * N) for g in range(G)])
    np.testing.assert_array_equal(np.sort(inputs), expected)
    # Ranks own disjoint, contiguous blocks of lanes.
    owned = [ds.lanes for ds in ranks]
    assert sum(owned, []) == list(range(G))


def test_lane_continuity_and_wrap_to_new_epoch():
    ds = LaneDataset(_tokens(200), 2, 10)
    S = ds.steps_per_epoch  # lane of 100 tokens: 9 steps
    assert S == 9
    prev = None
    for _ in range(S):
        x, y = ds.next_batch()
        if prev is not None:
            assert torch.equal(x[:, 0], prev[:, -1] + 1)  # each lane continues where it stopped
        prev = x
    assert ds.epoch == 0
    x, _ = ds.next_batch()
    assert ds.epoch == 1 and ds.is_new_stream and ds.step == 1
    assert x[:, 0].tolist() == [0, 100]


def test_restore_equals_uninterrupted():
    tokens = _tokens(5000)
    ref = LaneDataset(tokens, 4, 11, dp_rank=1, dp_world_size=2)
    ref_batches = [ref.next_batch() for _ in range(3 * ref.steps_per_epoch + 5)]
    for cut in (0, 1, ref.steps_per_epoch, ref.steps_per_epoch + 3, 2 * ref.steps_per_epoch + 7):
        a = LaneDataset(tokens, 4, 11, dp_rank=1, dp_world_size=2)
        for _ in range(cut):
            a.next_batch()
        state = a.state_dict()
        b = LaneDataset(tokens, 4, 11, dp_rank=1, dp_world_size=2)
        b.load_state_dict(state)
        for i in range(cut, len(ref_batches)):
            x, y = b.next_batch()
            assert torch.equal(x, ref_batches[i][0]) and torch.equal(y, ref_batches[i][1])
            assert b.is_new_stream == (i % ref.steps_per_epoch == 0)
    with pytest.raises(ValueError, match="seq_length"):
        LaneDataset(tokens, 4, 12).load_state_dict(state)


def test_micro_batches_own_fixed_lanes():
    ds = LaneDataset(_tokens(4800), 8, 5, dp_rank=1, dp_world_size=2)
    assert ds.micro_batch_lanes(2) == [[4, 5], [6, 7]]
    L = ds.lane_length
    for step in range(4):
        micro = ds.micro_batches(2)
        assert len(micro) == 2
        for i, (x, y) in enumerate(micro):
            lanes = ds.micro_batch_lanes(2)[i]
            assert x[:, 0].tolist() == [g * L + step * 5 for g in lanes]
            assert torch.equal(y, x + 1)
    x, y = LaneDataset(_tokens(4800), 8, 5).next_batch()
    parts = split_micro_batches(x, y, 4)
    assert [p[0].shape[0] for p in parts] == [4, 4]
    with pytest.raises(ValueError, match="micro-batches"):
        ds.micro_batches(3)


def test_bad_configurations():
    with pytest.raises(ValueError, match="divisible"):
        LaneDataset(_tokens(1000), 6, 4, 0, 4)
    with pytest.raises(ValueError, match="fewer than"):
        LaneDataset(_tokens(100), 10, 10)
    with pytest.raises(ValueError, match="dp_rank"):
        LaneDataset(_tokens(100), 2, 4, 2, 2)


def test_load_split_memmaps_shards(tmp_path):
    text = tmp_path / "corpus.txt"
    data = bytes(range(256)) * 40
    text.write_bytes(data)
    prefix = str(tmp_path / "out" / "c")
    preprocess_text([str(text)], prefix, split=(80, 10, 10), progress=False)
    tokens, meta = load_split(prefix, "valid")
    assert isinstance(tokens, np.memmap)
    assert meta["vocab_size"] == 256 and meta["tokenizer"]["type"] == "byte"
    n = len(data)
    assert bytes(tokens) == data[round(n * 0.8) : round(n * 0.9)]
    ds = LaneDataset(tokens, 2, 16)
    x, y = ds.next_batch()
    assert x[0, :4].tolist() == list(tokens[:4])


def test_keep_last_partial_step_predicts_every_token():
    tokens = _tokens(1000)
    ds = LaneDataset(tokens, 1, 64, drop_last=False)
    assert ds.steps_per_epoch == 16  # 999 targets: 15 full steps + 39
    xs, ys = zip(*(ds.next_batch() for _ in range(ds.steps_per_epoch)))
    assert xs[-1].shape == (1, 999 - 15 * 64)
    np.testing.assert_array_equal(torch.cat(ys, 1)[0].numpy(), tokens[1:])
    np.testing.assert_array_equal(torch.cat(xs, 1)[0].numpy(), tokens[:-1])
    x, _ = ds.next_batch()
    assert ds.is_new_stream and ds.epoch == 1 and x.shape == (1, 64)


@pytest.mark.parametrize("damage", ["no-splits", "no-split", "no-tokens", "not-a-number", "not-an-object"])
def test_load_split_damaged_metadata_is_a_data_error(tmp_path, damage):
    import json

    from megatron_ls.data import DataError

    text = tmp_path / "corpus.txt"
    text.write_bytes(bytes(range(256)) * 4)
    prefix = str(tmp_path / "c")
    preprocess_text([str(text)], prefix, split=(80, 10, 10), progress=False)
    meta = json.load(open(prefix + ".json"))
    if damage == "no-splits":
        del meta["splits"]
    elif damage == "no-split":
        del meta["splits"]["valid"]
    elif damage == "no-tokens":
        del meta["splits"]["valid"]["tokens"]
    elif damage == "not-a-number":
        meta["splits"]["valid"]["tokens"] = "12"
    else:
        meta = [meta]
    json.dump(meta, open(prefix + ".json", "w"))
    with pytest.raises(DataError, match=f"{prefix}.json"):
        load_split(prefix, "valid")
