"""Which earlier positions a query may attend to: the model's segment-with-memory semantics.

TransformerLSLM runs a stream as consecutive segments of N tokens, each with the layer inputs of
the previous M tokens as memory (training, evaluation). A query at position t in the segment
starting at S = (t // N) * N therefore sees the positions max(0, S - M) .. t and nothing older:
window keys s with t - w < s <= t, landmarks of the completed chunks from max(0, S - M) / c on.
Reproducing exactly that rule makes incremental decoding equal to the segmented full forward.

With no segment length (N = None) the stream is one segment from its start: every completed
chunk's landmark stays visible, and the per-token cost grows as O(w + t / c).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ContextRule:
    segment_length: int | None  # N; None = one segment from the stream start
    mem_length: int  # M

    def __post_init__(self) -> None:
        if self.segment_length is not None and self.segment_length < 1:
            raise ValueError(f"segment length must be positive or None, got {self.segment_length}")
        if self.mem_length < 0:
            raise ValueError(f"memory length must be >= 0, got {self.mem_length}")

    def segment_start(self, t: int) -> int:
        return 0 if self.segment_length is None else (t // self.segment_length) * self.segment_length

    def first_visible(self, t: int) -> int:
        """The oldest position the query at t can see (through the window or a landmark)."""
        if self.segment_length is None:
            return 0
        return max(0, self.segment_start(t) - self.mem_length)

    def check(self, chunk: int) -> None:
        for name, value in (("segment length", self.segment_length), ("memory length", self.mem_length)):
            if value is not None and value % chunk:
                raise ValueError(f"{name} ({value}) must be a multiple of the chunk size ({chunk})")

    def describe(self) -> str:
        if self.segment_length is None:
            return "one segment from the stream start (every landmark kept)"
        return f"segments of {self.segment_length} tokens with {self.mem_length} tokens of memory"
