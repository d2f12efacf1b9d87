"""A snapshot of some streams' rows that costs nothing to take: rows are copied only before they change.

A checkpoint of 1,000 streams holds about 1.1 GB of per-stream state (the RFP traces); copying it
while the tick loop waits stalled learning for seconds. Instead the loop pauses only to pin the
chunks that hold the changed streams (``RowSnapshot``) and goes on; a writer thread then reads each
row from those chunks. Copy on write, per row: every write into a slot goes through
``StreamStates.touch`` (``Slab.__setitem__`` and the ``slab[int]`` view, learner/state.py), which
calls ``preserve`` first, and a row the writer has not read yet is copied aside before it changes.
The lock below orders the two threads: a row is either read by the writer before the tick writes
it, or preserved first; never torn.

The rows of a chunk released meanwhile (its streams dropped or spilled) stay readable: the snapshot
keeps a reference to every chunk tensor of the moment, and a released chunk is never written again.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from learner.state import StreamStates


class RowSnapshot:
    """The rows of the streams in ``slots`` ({slot: stream id}) as they are now, read later.

    Examples
    --------
    >>> from learner.state import StreamStates
    >>> st = StreamStates(n_units=2, embed_dim=1)
    >>> slot = int(st.slots(["a"])[0])
    >>> snap = RowSnapshot(st, {slot: "a"})
    >>> st.h[slot] = 5.0                  # the loop goes on; the row is preserved first
    >>> snap.take(slot)["h"].tolist(), st.h.read(slot).tolist()
    ([0.0, 0.0], [5.0, 5.0])
    """

    def __init__(self, states: StreamStates, slots: dict[int, str]) -> None:
        self._size = states.chunk
        # the chunk tensors of this moment, per slab: a chunk released later stays readable here
        self._chunks = {name: list(slab.chunks) for name, slab in states.named_slabs()}
        self.streams = dict(slots)  # slot -> stream id, every row of the snapshot
        self._pending = set(slots)  # rows the writer has not taken yet
        self._saved: dict[int, dict[str, torch.Tensor]] = {}  # rows preserved before a write
        self._lock = threading.Lock()
        self._states = states
        states.snapshot_in_flight = self

    def _copy(self, slot: int) -> dict[str, torch.Tensor]:
        c, r = divmod(slot, self._size)
        out = {}
        for name, chunks in self._chunks.items():
            chunk = chunks[c]
            assert chunk is not None, "a snapshot row in a chunk released before the snapshot"
            out[name] = chunk[r].clone()
        return out

    def preserve(self, slots: list[int]) -> None:
        """Called before these slots are written (tick thread): copy the rows still to be taken."""
        if not self._pending:
            return
        with self._lock:
            for s in slots:
                if s in self._pending and s not in self._saved:
                    self._saved[s] = self._copy(s)

    def take(self, slot: int) -> dict[str, torch.Tensor]:
        """One row as it was at the snapshot, on the CPU (writer thread); each row is taken once."""
        with self._lock:
            rows = self._saved.pop(slot, None)
            if rows is None:
                rows = self._copy(slot)
            self._pending.discard(slot)
        return {name: t.to("cpu") for name, t in rows.items()}

    def release(self) -> None:
        """The writer is done (or gave up): writes need no preserving any more."""
        with self._lock:
            self._pending.clear()
            self._saved.clear()
        if self._states.snapshot_in_flight is self:
            self._states.snapshot_in_flight = None


def cloned(tree: Any) -> Any:
    """``tree`` (dicts, lists, tuples of tensors and plain values) with every tensor copied."""
    if torch.is_tensor(tree):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: cloned(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [cloned(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(cloned(v) for v in tree)
    return tree
