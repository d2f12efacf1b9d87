"""Per-stream state: every stream's h, c, RFP traces, step count and last prediction, in chunked slabs.

One stream is one participant's session. Each resident stream owns one slot (a row of every
``Slab``, learner/slab.py). Slabs are stored in fixed-size chunks of ``chunk`` slots (64 by
default: about 70 MB of RFP traces at the default model), allocated when every slot is taken and
never copied: adding the 2,049th stream allocates one more chunk instead of doubling (and copying)
everything.
Dropping a stream frees its slot for the next new stream (the lowest free slot is handed out first,
so the chunks stay dense), and a chunk whose every slot is free is released, so memory falls again.

A cap (``max_resident`` streams, which the service derives from megabytes) bounds the chunks. At
the cap, with a spill folder, the least recently used stream not in the current tick is written to
one file there and its slot reused; its next fixation (or any query) reads it back bit for bit.
Without a spill folder a new stream past the cap is refused with :class:`StateFull`.

A reset zeroes h, c and the traces of a stream together (spec A12: resetting only some of them gives
the gradient of a different function) and leaves every other slot untouched. Memory per stream is
fixed: it does not grow with the length of the stream.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from learner.errors import InputError, StateFull
from learner.slab import Plan, Slab

if TYPE_CHECKING:
    from learner.snapshot import RowSnapshot


class StreamStates:
    """Slot-indexed state of many streams, in chunks; optionally capped, with idle streams spilled.

    ``traces`` maps a trace name to its per-slot shape (e.g. ``{"W": (2, N, M + 1)}``); the learner
    that owns the states decides which traces exist (none for BPTT). ``inputs`` (M) keeps each
    stream's last normalised trunk features in ``u``, which the context-list embedding reads when
    it scores the next fixation (0: none kept). ``max_resident`` caps the streams held in memory and
    ``spill_dir`` (see the module docstring) is where the others wait.

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
        chunk: int = 64,
        max_resident: int | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.n_units, self.embed_dim, self.inputs = n_units, embed_dim, inputs
        self.trace_shapes = dict(traces or {})
        self.device, self.dtype = torch.device(device), dtype
        self.chunk = chunk
        self.max_resident: int | None = None
        self.spill_dir: Path | None = None
        # a checkpoint being written beside the tick loop (learner/snapshot.py): rows it has not read
        # yet are copied before they change
        self.snapshot_in_flight: RowSnapshot | None = None
        self.writing = False  # a checkpoint of these states is between its snapshot and its commit
        self._clear_all()
        self.limit(max_resident, spill_dir)

    def _clear_all(self) -> None:
        dt = self.dtype
        self.h = Slab(self, (self.n_units,), dt)  # (S, N)
        self.c = Slab(self, (self.n_units,), dt)  # (S, N)
        self.pred = Slab(self, (self.embed_dim,), dt)  # (S, D)
        # the last fixation's normalised trunk features, read by the context-list embedding (S, M)
        self.u = Slab(self, (self.inputs,), dt)
        self.step = Slab(self, (), torch.long)  # (S,) fixations since reset
        self.total = Slab(self, (), torch.long)  # (S,) fixations ever
        self.trace: dict[str, Slab] = {k: Slab(self, shape, dt) for k, shape in self.trace_shapes.items()}
        self._slot_of: dict[str, int] = {}
        self._sid_at: dict[int, str] = {}  # the inverse of _slot_of
        self.dirty: set[str] = set()  # streams whose rows changed since the last checkpoint snapshot
        self.checkpoint_base: object | None = None  # the last commit (learner/checkpoint.py Committed)
        self._free: list[int] = []  # a heap: the lowest free slot first
        self._live: list[int] = []  # live slots per chunk
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident streams, least recently used first
        self._spilled: set[str] = set()
        self._plan: tuple[torch.Tensor, Plan, list[int]] | None = None  # slots(), their plan and list
        self.spills = self.unspills = 0  # counters, for metrics

    def limit(self, max_resident: int | None, spill_dir: str | os.PathLike[str] | None = None) -> None:
        """Cap the resident streams; with ``spill_dir``, spill the least recently used beyond it.

        The folder is swap space, emptied here: a checkpoint holds every stream, spilled or not.
        """
        if max_resident is not None and max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        if self._spilled:
            raise RuntimeError("cannot change the spill folder while streams are spilled")
        self.max_resident = max_resident
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self.spill_dir.mkdir(parents=True, exist_ok=True)

    # --- slots ---------------------------------------------------------------------------------
    def touch(self, slots: torch.Tensor | int) -> None:
        """Called by every ``Slab`` write (and ``slab[int]`` view): mark the streams changed, and let
        a snapshot being written copy their rows first."""
        if isinstance(slots, int):
            listed = [slots]
        else:  # the tick's slots (every slab write of a tick): their list is kept, no device read
            cached = self._plan
            listed = cached[2] if cached is not None and cached[0] is slots else slots.tolist()
        for s in listed:
            sid = self._sid_at.get(s)
            if sid is not None:
                self.dirty.add(sid)
        snap = self.snapshot_in_flight
        if snap is not None:
            snap.preserve(listed)

    def plan(self, slots: torch.Tensor) -> Plan:
        """Which chunk rows ``slots`` (B,) are; cached for the tensor ``slots()`` returned last."""
        cached = self._plan
        if cached is not None and cached[0] is slots:
            return cached[1]
        return self._make_plan(slots)

    def _make_plan(self, slots: torch.Tensor, listed: list[int] | None = None) -> Plan:
        size, dev = self.chunk, self.device
        listed = slots.tolist() if listed is None else listed
        by_chunk: dict[int, list[int]] = {}
        for i, s in enumerate(listed):
            by_chunk.setdefault(s // size, []).append(i)
        if len(by_chunk) == 1:
            (c,) = by_chunk
            return [(c, None, slots if c == 0 else slots - c * size)]
        return [
            (
                c,
                torch.tensor(pos, dtype=torch.long, device=dev),
                torch.tensor([listed[i] - c * size for i in pos], dtype=torch.long, device=dev),
            )
            for c, pos in by_chunk.items()
        ]

    def named_slabs(self) -> Iterator[tuple[str, Slab]]:
        yield from (("h", self.h), ("c", self.c), ("pred", self.pred), ("u", self.u))
        yield from (("step", self.step), ("total", self.total))
        yield from ((f"trace.{k}", v) for k, v in self.trace.items())

    def _add_chunk(self) -> None:
        c = next((i for i, n in enumerate(self._live) if self.h.chunks[i] is None), len(self._live))
        for _, slab in self.named_slabs():
            fresh = torch.zeros(self.chunk, *slab.shape, dtype=slab.dtype, device=self.device)
            if c == len(slab.chunks):
                slab.chunks.append(fresh)
            else:
                slab.chunks[c] = fresh
        if c == len(self._live):
            self._live.append(0)
        for s in range(c * self.chunk, (c + 1) * self.chunk):
            heapq.heappush(self._free, s)

    def _release_chunk(self, c: int) -> None:
        for _, slab in self.named_slabs():
            slab.chunks[c] = None
        lo, hi = c * self.chunk, (c + 1) * self.chunk
        self._free = [s for s in self._free if not lo <= s < hi]
        heapq.heapify(self._free)

    def _take_slot(self, sid: str, busy: set[str]) -> int:
        """A slot for ``sid``: free, a new chunk's, or (at the cap) the least recently used one's."""
        if self.max_resident is not None and len(self._slot_of) >= self.max_resident:
            victim = next((s for s in self._lru if s not in busy), None)
            if victim is None or self.spill_dir is None:
                raise StateFull(
                    f"{len(self._slot_of)} streams fill the state memory"
                    + ("" if self.spill_dir is None else " and every one is in this tick")
                )
            self._spill(victim)
        if not self._free:
            self._add_chunk()
        slot = heapq.heappop(self._free)
        self._slot_of[sid] = slot
        self._sid_at[slot] = sid
        self._live[slot // self.chunk] += 1
        self._lru[sid] = None
        return slot

    def _free_slot(self, sid: str) -> int:
        slot = self._slot_of.pop(sid)
        del self._sid_at[slot]
        del self._lru[sid]
        c = slot // self.chunk
        self._live[c] -= 1
        if self._live[c]:
            heapq.heappush(self._free, slot)
        else:
            self._release_chunk(c)
        self._plan = None
        return slot

    def slots(self, stream_ids: Sequence[str], *, create: bool = True) -> torch.Tensor:
        """Slot index of each stream, allocating slots for new ones: LongTensor (B,)."""
        if len(set(stream_ids)) != len(stream_ids):
            raise InputError("a stream may appear at most once in a tick")
        out = []
        busy = set(stream_ids)
        for sid in stream_ids:
            slot = self._slot_of.get(sid)
            if slot is None:
                if sid in self._spilled:
                    slot = self._unspill(sid, busy)
                elif not create:
                    raise KeyError(sid)
                else:
                    slot = self._take_slot(sid, busy)
                    for _, slab in self.named_slabs():
                        slab[slot] = 0
            else:
                self._lru.move_to_end(sid)
            out.append(slot)
        slots = torch.tensor(out, dtype=torch.long, device=self.device)
        self._plan = (slots, self._make_plan(slots, out), out)
        return slots

    def can_admit(self, new: int) -> bool:
        """Whether ``new`` more streams fit (always, with a spill folder and room to spill)."""
        if self.max_resident is None or self.spill_dir is not None:
            return True
        return len(self._slot_of) + new <= self.max_resident

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._slot_of or stream_id in self._spilled

    def __len__(self) -> int:
        return len(self._slot_of) + len(self._spilled)

    def stream_ids(self) -> list[str]:
        """Resident streams in slot order, then the spilled ones by name."""
        return sorted(self._slot_of, key=self._slot_of.__getitem__) + sorted(self._spilled)

    def slot_of(self, stream_id: str) -> int:
        """The stream's slot (a spilled stream is read back first)."""
        slot = self._slot_of.get(stream_id)
        if slot is None:
            if stream_id not in self._spilled:
                raise KeyError(stream_id)
            slot = self._unspill(stream_id, {stream_id})
        return slot

    @property
    def resident(self) -> int:
        return len(self._slot_of)

    @property
    def spilled(self) -> int:
        return len(self._spilled)

    def allocated_bytes(self) -> int:
        """Bytes of the chunks held (what the state costs in memory, free slots included)."""
        chunks = sum(t is not None for t in self.h.chunks)
        return chunks * self.chunk * self.nbytes_per_stream()

    # --- spilling ----------------------------------------------------------------------------------
    def _spill_path(self, sid: str) -> Path:
        assert self.spill_dir is not None
        return self.spill_dir / f"{hashlib.sha256(sid.encode()).hexdigest()[:32]}.pt"

    def row(self, sid: str) -> dict[str, torch.Tensor]:
        """One stream's tensors by name (copies, on the CPU), resident or spilled."""
        slot = self._slot_of.get(sid)
        if slot is None:
            if sid not in self._spilled:
                raise KeyError(sid)
            saved = torch.load(self._spill_path(sid), map_location="cpu", weights_only=True)
            return {k: v for k, v in saved.items() if k != "id"}
        return {name: slab.read(slot).to("cpu", copy=True) for name, slab in self.named_slabs()}

    def _spill(self, sid: str) -> None:
        rows: dict[str, object] = {"id": sid, **self.row(sid)}
        torch.save(rows, self._spill_path(sid))
        self._free_slot(sid)
        self._spilled.add(sid)
        self.spills += 1

    def _unspill(self, sid: str, busy: set[str]) -> int:
        path = self._spill_path(sid)
        saved = torch.load(path, map_location="cpu", weights_only=True)
        slot = self._take_slot(sid, busy)  # may raise StateFull: then the stream stays spilled
        self._spilled.discard(sid)
        changed = sid in self.dirty
        for name, slab in self.named_slabs():
            slab[slot] = saved[name].to(self.device)
        if not changed:  # back as it was: a checkpoint need not write it again
            self.dirty.discard(sid)
        path.unlink()
        self.unspills += 1
        return slot

    # --- resets --------------------------------------------------------------------------------
    def reset(self, slots: torch.Tensor) -> None:
        """Start a new sequence in these slots: h, c, traces and step count to zero, together."""
        if slots.numel():
            for name, slab in self.named_slabs():
                if name != "total":
                    slab[slots] = 0

    def drop(self, stream_id: str) -> None:
        """Forget a stream and free its slot (and its chunk, when that was the chunk's last stream)."""
        self.dirty.discard(stream_id)
        if stream_id in self._spilled:
            self._spilled.discard(stream_id)
            self._spill_path(stream_id).unlink(missing_ok=True)
            return
        self._free_slot(stream_id)

    def nbytes_per_stream(self) -> int:
        return sum(slab.row_bytes() for _, slab in self.named_slabs())

    # --- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """Tensors of every stream (resident in slot order, then spilled), plus their ids: plain types."""
        ids = self.stream_ids()
        rows = [self.row(sid) for sid in ids]
        out: dict[str, object] = {"ids": ids}
        for name, slab in self._saved_slabs().items():
            out[name] = (
                torch.stack([r[name] for r in rows])
                if rows
                else torch.empty(0, *slab.shape, dtype=slab.dtype)
            )
        return out

    def load_state_dict(self, sd: dict[str, object]) -> None:
        ids = sd["ids"]
        assert isinstance(ids, list)
        saved = self._saved_slabs()
        for name, slab in saved.items():
            src = sd[name]
            assert isinstance(src, torch.Tensor)
            if tuple(src.shape[1:]) != slab.shape:  # refused before anything is replaced
                raise ValueError(
                    f"stream state {name!r} has shape {tuple(src.shape[1:])}, expected {slab.shape}"
                )
        self.load_rows({"id": sid, **{name: sd[name][i] for name in saved}} for i, sid in enumerate(ids))  # type: ignore[index]

    def load_rows(self, rows: Iterable[dict[str, object]]) -> None:
        """Replace every stream by ``rows``, one dict per stream (``id`` and its tensors by name, as
        ``row`` gives them), read one at a time: a checkpoint's streams are never all in memory twice."""
        self._clear_all()
        self.limit(self.max_resident, self.spill_dir)
        saved = self._saved_slabs()
        for row in rows:
            sid = row["id"]
            assert isinstance(sid, str)
            for name, slab in saved.items():
                src = row[name]
                assert isinstance(src, torch.Tensor)
                if tuple(src.shape) != slab.shape:
                    raise ValueError(
                        f"stream state {name!r} has shape {tuple(src.shape)}, expected {slab.shape}"
                    )
            slot = int(self.slots([sid])[0])
            for name, slab in saved.items():
                src = row[name]
                assert isinstance(src, torch.Tensor)
                slab[slot] = src.to(device=self.device, dtype=slab.dtype)

    def location(self, stream_id: str) -> int | Path:
        """Where a stream's rows are: its slot, or its spill file (written once, never rewritten)."""
        slot = self._slot_of.get(stream_id)
        if slot is not None:
            return slot
        if stream_id not in self._spilled:
            raise KeyError(stream_id)
        return self._spill_path(stream_id)

    def _saved_slabs(self) -> dict[str, Slab]:
        named = dict(self.named_slabs())
        if not self.inputs:  # checkpoints of a state-only embedding keep their old keys
            del named["u"]
        return named
