"""A ``Slab``: one per-stream quantity (h, c, a trace, ...) kept in fixed-size chunks of slots.

``StreamStates`` (``learner/state.py``) owns one slab per quantity and decides which slot is which
stream; a slab only stores rows and routes every write through its owner's ``touch`` (incremental
checkpoints, copy on write while one is written).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from learner.state import StreamStates

Plan = list[
    tuple[int, torch.Tensor | None, torch.Tensor]
]  # (chunk, rows of the tick or None: all, rows in it)


class Slab:
    """One per-stream quantity of shape (S, ...) kept in chunks of ``chunk`` rows.

    Indexed like a tensor by slot: ``slab[slots]`` with a LongTensor (B,) gives a copy (B, ...),
    ``slab[slots] = x`` writes rows, ``slab[s]`` with an int gives a view of one row (which the
    caller may write through), ``slab.read(s)`` a view that must only be read. Every way to write
    goes through ``StreamStates.touch`` first: it marks the stream changed (for incremental
    checkpoints) and, while a checkpoint snapshot is being written, preserves the row beforehand.
    """

    def __init__(self, owner: StreamStates, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._owner, self.shape, self.dtype = owner, shape, dtype
        self.chunks: list[torch.Tensor | None] = []  # each (chunk, *shape), None: released

    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def row_bytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.element_size()

    def _chunk(self, c: int) -> torch.Tensor:
        t = self.chunks[c]
        assert t is not None, "slot in a released chunk"
        return t

    def __getitem__(self, slots: torch.Tensor | int) -> torch.Tensor:
        size = self._owner.chunk
        if isinstance(slots, int):
            self._owner.touch(slots)  # a view: the caller may write through it
            return self._chunk(slots // size)[slots % size]
        plan = self._owner.plan(slots)
        if len(plan) == 1:
            c, _, rows = plan[0]
            return self._chunk(c)[rows]  # a copy
        out = torch.empty(len(slots), *self.shape, dtype=self.dtype, device=self._owner.device)
        for c, pos, rows in plan:
            out[pos] = self._chunk(c)[rows]
        return out

    def read(self, slot: int) -> torch.Tensor:
        """A view of one row, to read only (writing through it would escape ``touch``)."""
        size = self._owner.chunk
        return self._chunk(slot // size)[slot % size]

    def __setitem__(self, slots: torch.Tensor | int, value: torch.Tensor | float) -> None:
        self._owner.touch(slots)
        size = self._owner.chunk
        if isinstance(slots, int):
            self._chunk(slots // size)[slots % size] = value
            return
        for c, pos, rows in self._owner.plan(slots):
            self._chunk(c)[rows] = value if pos is None or not torch.is_tensor(value) else value[pos]

    def data_ptrs(self) -> list[int]:
        return [0 if t is None else t.data_ptr() for t in self.chunks]
