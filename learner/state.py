"""Per-stream state: every stream's h, c, RFP traces, step count and last prediction, in slot tensors.

One stream is one participant's session. Each stream owns one slot (a row of every tensor below);
slots are reused after a stream is dropped, and the slab doubles when full. A reset zeroes h, c and
the traces of a stream together (spec A12: resetting only some of them gives the gradient of a
different function) and leaves every other slot untouched.

Memory per stream is fixed: it does not grow with the length of the stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from learner.errors import InputError


class StreamStates:
    """Slot-indexed state of many streams.

    ``traces`` maps a trace name to its per-slot shape (e.g. ``{"W": (2, N, M + 1)}``); the learner
    that owns the states decides which traces exist (none for BPTT). ``inputs`` (M) keeps each
    stream's last normalised trunk features in ``u``, which the context-list embedding reads when
    it scores the next fixation (0: none kept).

    Examples
    --------
    >>> st = StreamStates(n_units=4, embed_dim=3, traces={"v": (2, 4, 4)})
    >>> slots = st.slots(["a", "b"])
    >>> st.h[slots].shape
    torch.Size([2, 4])
    >>> st.reset(st.slots(["a"])); st.stream_ids()
    ['a', 'b']
    """

    def __init__(
        self,
        n_units: int,
        embed_dim: int,
        traces: dict[str, tuple[int, ...]] | None = None,
        *,
        inputs: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        capacity: int = 8,
    ) -> None:
        self.n_units, self.embed_dim, self.inputs = n_units, embed_dim, inputs
        self.trace_shapes = dict(traces or {})
        self.device, self.dtype = torch.device(device), dtype
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        """Empty slab of ``capacity`` free slots."""
        dev, dt, n = self.device, self.dtype, self.n_units
        self._slot_of: dict[str, int] = {}
        self._free: list[int] = []
        self.capacity = 0
        self.h = torch.empty(0, n, device=dev, dtype=dt)  # (S, N)
        self.c = torch.empty(0, n, device=dev, dtype=dt)  # (S, N)
        self.pred = torch.empty(0, self.embed_dim, device=dev, dtype=dt)  # (S, D)
        # the last fixation's normalised trunk features, read by the context-list embedding (S, M)
        self.u = torch.empty(0, self.inputs, device=dev, dtype=dt)
        self.step = torch.empty(0, dtype=torch.long, device=dev)  # (S,) fixations since reset
        self.total = torch.empty(0, dtype=torch.long, device=dev)  # (S,) fixations ever
        self.trace: dict[str, torch.Tensor] = {
            k: torch.empty(0, *shape, device=dev, dtype=dt) for k, shape in self.trace_shapes.items()
        }
        self._grow(capacity)

    # --- slots ---------------------------------------------------------------------------------
    def _grow(self, capacity: int) -> None:
        old = self.capacity
        if capacity <= old:
            return

        def extend(t: torch.Tensor) -> torch.Tensor:
            fresh = t.new_zeros(capacity - old, *t.shape[1:])
            return torch.cat([t, fresh]) if old else fresh

        self.h, self.c, self.pred, self.u = extend(self.h), extend(self.c), extend(self.pred), extend(self.u)
        self.step, self.total = extend(self.step), extend(self.total)
        self.trace = {k: extend(v) for k, v in self.trace.items()}
        self._free.extend(range(capacity - 1, old - 1, -1))  # pop() hands out the lowest first
        self.capacity = capacity

    def slots(self, stream_ids: Sequence[str], *, create: bool = True) -> torch.Tensor:
        """Slot index of each stream, allocating slots for new ones: LongTensor (B,)."""
        if len(set(stream_ids)) != len(stream_ids):
            raise InputError("a stream may appear at most once in a tick")
        out = []
        for sid in stream_ids:
            slot = self._slot_of.get(sid)
            if slot is None:
                if not create:
                    raise KeyError(sid)
                if not self._free:
                    self._grow(max(8, 2 ** math.ceil(math.log2(self.capacity + 1))))
                slot = self._free.pop()
                self._slot_of[sid] = slot
                self._clear(torch.tensor([slot], device=self.device))
                self.total[slot] = 0
            out.append(slot)
        return torch.tensor(out, dtype=torch.long, device=self.device)

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def stream_ids(self) -> list[str]:
        return sorted(self._slot_of, key=self._slot_of.__getitem__)

    def slot_of(self, stream_id: str) -> int:
        return self._slot_of[stream_id]

    # --- resets --------------------------------------------------------------------------------
    def _clear(self, slots: torch.Tensor) -> None:
        self.h[slots] = 0
        self.c[slots] = 0
        self.pred[slots] = 0
        self.u[slots] = 0
        self.step[slots] = 0
        for t in self.trace.values():
            t[slots] = 0

    def reset(self, slots: torch.Tensor) -> None:
        """Start a new sequence in these slots: h, c, traces and step count to zero, together."""
        if slots.numel():
            self._clear(slots)

    def drop(self, stream_id: str) -> None:
        """Forget a stream and free its slot."""
        slot = self._slot_of.pop(stream_id)
        self._clear(torch.tensor([slot], device=self.device))
        self.total[slot] = 0
        self._free.append(slot)

    def nbytes_per_stream(self) -> int:
        per = [self.h, self.c, self.pred, self.u, self.step, self.total, *self.trace.values()]
        return sum(t[0].numel() * t.element_size() for t in per)

    # --- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """Tensors of the live streams only, in slot order, plus their ids: plain types for safe loading."""
        ids = self.stream_ids()
        idx = torch.tensor([self._slot_of[s] for s in ids], dtype=torch.long, device=self.device)
        out: dict[str, object] = {"ids": ids}
        for name, t in self._named_tensors().items():
            out[name] = t[idx].cpu()
        return out

    def load_state_dict(self, sd: dict[str, object]) -> None:
        ids = sd["ids"]
        assert isinstance(ids, list)
        self._allocate(max(8, len(ids)))
        idx = self.slots(ids)
        for name, t in self._named_tensors().items():
            src = sd[name]
            assert isinstance(src, torch.Tensor)
            if src.shape[1:] != t.shape[1:]:
                raise ValueError(
                    f"stream state {name!r} has shape {tuple(src.shape[1:])}, expected {tuple(t.shape[1:])}"
                )
            t[idx] = src.to(device=t.device, dtype=t.dtype)

    def _named_tensors(self) -> dict[str, torch.Tensor]:
        named = {"h": self.h, "c": self.c, "pred": self.pred, "step": self.step, "total": self.total}
        if self.inputs:  # checkpoints of a state-only embedding keep their old keys
            named["u"] = self.u
        named.update({f"trace.{k}": v for k, v in self.trace.items()})
        return named
