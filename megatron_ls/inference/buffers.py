"""A time-ordered tensor buffer with amortised O(1) append and drop-front (the decoder's caches)."""

from __future__ import annotations

import torch


class TimeBuffer:
    """Rows along `dim` appended at the end and dropped from the front, without an O(length) copy per step.

    Storage grows by doubling; dropped rows are only skipped until they fill half the storage, then the
    live rows move to the front once. `view()` is a strided view of the live rows in time order.
    """

    def __init__(self, dim: int = 2) -> None:
        self.dim = dim
        self._data: torch.Tensor | None = None
        self._start = 0
        self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    def append(self, rows: torch.Tensor) -> None:
        n = rows.shape[self.dim]
        if self._data is None:
            shape = list(rows.shape)
            shape[self.dim] = max(2 * n, 16)
            self._data = rows.new_empty(shape)
        cap = self._data.shape[self.dim]
        if self._end + n > cap:
            live = len(self)
            if self._start > 0 and live + n <= cap // 2:
                self._data.narrow(self.dim, 0, live).copy_(self._data.narrow(self.dim, self._start, live).clone())
            else:
                shape = list(self._data.shape)
                shape[self.dim] = max(2 * cap, 2 * (live + n))
                grown = self._data.new_empty(shape)
                grown.narrow(self.dim, 0, live).copy_(self._data.narrow(self.dim, self._start, live))
                self._data = grown
            self._start, self._end = 0, live
        self._data.narrow(self.dim, self._end, n).copy_(rows)
        self._end += n

    def drop_front(self, n: int) -> None:
        self._start += max(0, min(n, len(self)))

    def view(self) -> torch.Tensor:
        if self._data is None:
            raise ValueError("empty buffer")
        return self._data.narrow(self.dim, self._start, len(self))
