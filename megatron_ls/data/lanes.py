"""Stream ("lane") dataset: what training with a memory reads (DESIGN.md §3).

A split of T tokens is cut into G = global_batch_size contiguous lanes of L = T // G tokens;
lane g is tokens[g*L : (g+1)*L]. The last T - G*L tokens of the split are dropped, and so are
the last L - 1 - S*N tokens of each lane, S = steps_per_epoch = (L - 1) // N: a step takes N
inputs and the N targets shifted by one from every lane, so each lane needs N + 1 tokens per
step, and consecutive steps continue exactly where the previous one stopped (the memory of a
lane carries over). Data-parallel rank r owns lanes [r*G/dp, (r+1)*G/dp); micro-batch i of a
rank always owns the same lanes of that rank. After S steps the lanes restart from their
beginning (a new epoch): ``is_new_stream`` tells the training loop to reset the memory.

With ``drop_last=False`` (for evaluation: every token of a lane predicted) the last step of an
epoch is shorter than N and covers the rest of each lane; with one lane (G = 1) every token of
the split but the first is then a target exactly once.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from megatron_ls.errors import DataError

from .corpora import SPLIT_NAMES
from .indexed_dataset import MMapIndexedDataset
from .shards import meta_path, read_meta, split_prefix

if TYPE_CHECKING:
    import torch


class LaneDataset:
    def __init__(
        self,
        tokens,
        global_batch_size: int,
        seq_length: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if global_batch_size < 1 or seq_length < 1:
            raise ValueError(f"global_batch_size ({global_batch_size}) and seq_length ({seq_length}) must be >= 1")
        if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} is not in 0..{dp_world_size - 1}")
        if global_batch_size % dp_world_size:
            raise ValueError(
                f"global batch {global_batch_size} is not divisible by the data-parallel size {dp_world_size}"
            )
        self.tokens = tokens
        self.global_batch_size = global_batch_size
        self.seq_length = seq_length
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.lane_length = len(tokens) // global_batch_size
        self.drop_last = drop_last
        targets_per_lane = max(self.lane_length - 1, 0)
        self.steps_per_epoch = (
            targets_per_lane // seq_length if drop_last else -(-targets_per_lane // seq_length)
        )
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(tokens):,} tokens cut into {global_batch_size} lanes give {self.lane_length:,} tokens "
                f"per lane, fewer than the {seq_length + 1} one step needs"
            )
        self.local_batch_size = global_batch_size // dp_world_size
        first = dp_rank * self.local_batch_size
        self.lanes = list(range(first, first + self.local_batch_size))  # global lane ids owned here
        self._starts = np.asarray(self.lanes, dtype=np.int64) * self.lane_length
        self.epoch = 0
        self.step = 0  # steps taken in the current epoch: the next batch starts at step * N
        self.is_new_stream = True  # whether the batch last returned began the lanes

    @property
    def tokens_per_step(self) -> int:
        """Input tokens this rank consumes per step."""
        return self.local_batch_size * self.seq_length

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each int64 of shape (G/dp, N), for every owned lane in order."""
        import torch  # here, not at module level: preprocessing imports this package without torch

        if self.step == self.steps_per_epoch:
            self.epoch += 1
            self.step = 0
        pos = self.step * self.seq_length
        n = min(self.seq_length, self.lane_length - 1 - pos)  # < N only for the last step without drop_last
        rows = np.empty((self.local_batch_size, n + 1), dtype=np.int64)
        for i, start in enumerate(self._starts):
            rows[i] = self.tokens[start + pos : start + pos + n + 1]
        self.is_new_stream = self.step == 0
        self.step += 1
        batch = torch.from_numpy(rows)
        # Contiguous copies: the model may .view() them, and they must not alias each other.
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def micro_batch_lanes(self, num_micro: int) -> list[list[int]]:
        """Global lane ids of each micro-batch: micro-batch i owns the same lanes every step."""
        size = self._micro_size(num_micro)
        return [self.lanes[i * size : (i + 1) * size] for i in range(num_micro)]

    def micro_batches(self, num_micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next step as ``num_micro`` (inputs, targets) pairs over fixed groups of lanes."""
        return split_micro_batches(*self.next_batch(), self._micro_size(num_micro))

    def _micro_size(self, num_micro: int) -> int:
        if num_micro < 1 or self.local_batch_size % num_micro:
            raise ValueError(f"{self.local_batch_size} lanes per rank cannot form {num_micro} equal micro-batches")
        return self.local_batch_size // num_micro

    def state_dict(self) -> dict:
        """The exact position: the next batch after ``load_state_dict`` is the one that would follow."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "global_batch_size": self.global_batch_size,
            "seq_length": self.seq_length,
            "num_tokens": len(self.tokens),
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("global_batch_size", "seq_length", "num_tokens", "drop_last"):
            mine = len(self.tokens) if key == "num_tokens" else getattr(self, key)
            if key in state and state[key] != mine:
                raise ValueError(f"saved lane position has {key}={state[key]}, this dataset has {mine}")
        if not 0 <= state["step"] <= self.steps_per_epoch:
            raise ValueError(f"saved step {state['step']} outside 0..{self.steps_per_epoch}")
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.is_new_stream = self.step == 0


def split_micro_batches(
    inputs: torch.Tensor, targets: torch.Tensor, micro_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a rank's batch into consecutive groups of ``micro_size`` lanes."""
    return list(zip(inputs.split(micro_size), targets.split(micro_size)))


def load_split(prefix: str, split: str) -> tuple[np.ndarray, dict]:
    """The memory-mapped tokens of ``P_<split>`` and the metadata of ``P.json``.

    The metadata gets ``base_dir`` (the shard folder, for ``build_tokenizer``) added.
    """
    if split not in SPLIT_NAMES:
        raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLIT_NAMES)})")
    meta = read_meta(prefix)
    try:
        want = meta["splits"][split]["tokens"]
        assert isinstance(want, int)
    except (KeyError, TypeError, AssertionError):
        raise DataError(f"{meta_path(prefix)}: no token count of the {split} split (\"splits\": {{\"{split}\": "
                        "{\"tokens\": N}}); the metadata is damaged, run tools/preprocess_data.py again") from None
    ds = MMapIndexedDataset(split_prefix(prefix, split))
    if ds.num_tokens != want:
        raise DataError(
            f"{split_prefix(prefix, split)}.bin holds {ds.num_tokens:,} tokens, {prefix}.json says {want:,}"
        )
    meta = dict(meta, base_dir=os.path.dirname(os.path.abspath(prefix)))
    return ds.tokens, meta
