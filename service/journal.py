"""The command journal: a reset or delete over Redis is durable at once, not at the next checkpoint.

Why. A fixation is in the input stream, so a worker restarted from its checkpoint re-reads it and
learns it again; a reset or delete is not. Rather than answer such a command only once a checkpoint
taken after it has committed (seconds to minutes at thousands of streams, and a whole checkpoint for
one reset), the worker appends a record of it to a Redis stream of its own, ``foveate:journal``
(``XADD``; Redis's append-only file keeps it as it keeps the input), *before* applying it, and then
answers. A record that cannot be written is answered with an error and the command is not applied.

A record (:class:`JournaledCommand`) says what was done to which stream and where in the input:

- ``stream_through``: the greatest entry id of the stream that the worker had taken into a tick
  (applied or answered otherwise), empty when none: the command came after those, before the rest;
- ``input_through``: the greatest entry id of any stream taken into a tick: the command's place
  among the other streams' fixations (it matters to them only through shared limits, such as the
  count of streams that admits a new one).

A checkpoint saves :attr:`CommandJournal.through`, the last record the worker has taken in, and the
records it holds but has not applied yet (:attr:`CommandJournal.pending`, below); after its commit
the records up to ``through`` are trimmed (``XTRIM MINID``). A restarted worker takes the saved
pending records and those after ``through``, and while the broker re-reads the input after the
checkpoint's offset, applies each at its place, in journal order:

- before a tick that holds a fixation of its stream after ``stream_through``, or (holding none of
  the stream at or before it) any entry after ``input_through``;
- after a tick, or at once at restore, when every input entry up to ``input_through`` has been
  answered (a stream with no fixation after the command).

With one fixation per tick (``FOVEATE_MAX_BATCH=1``) this is exactly where the command was applied
the first time, so the restored run equals an uninterrupted one bit for bit; with larger ticks each
stream still sees its commands between the same two of its fixations.

Examples
--------
>>> journal = CommandJournal()
>>> journal.take([("7-0", {"command": "reset", "stream_id": "a", "stream_through": "5-0",
...                        "input_through": "6-0"})])
>>> journal.through, journal.due_after((5, 9)), [c.stream_id for c in journal.due_after((6, 0))]
('7-0', [], ['a'])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from service.messages import Fixation
from service.streams import EntryKey, entry_key, entry_text

#: The commands the journal carries: those that change a stream's state outside the input stream.
JOURNALED = ("reset", "delete")


def _text(key: EntryKey | None) -> str:
    return "" if key is None else entry_text(key)


def _text_field(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class JournaledCommand:
    """One journal record: ``command`` on ``stream_id`` after the input entries up to its marks."""

    journal_id: str
    command: str
    stream_id: str
    stream_through: EntryKey | None
    input_through: EntryKey | None

    def fields(self) -> dict[str, str]:
        """The record's fields in ``foveate:journal`` (its id is Redis's)."""
        return {
            "command": self.command,
            "stream_id": self.stream_id,
            "stream_through": _text(self.stream_through),
            "input_through": _text(self.input_through),
        }

    @classmethod
    def from_fields(cls, journal_id: str, fields: dict[str, Any]) -> JournaledCommand:
        text = {_text_field(k): _text_field(v) for k, v in fields.items()}
        return cls(journal_id, text["command"], text["stream_id"],
                   entry_key(text.get("stream_through")), entry_key(text.get("input_through")))  # fmt: skip

    def due_before(self, in_tick: dict[str, EntryKey], newest: EntryKey | None) -> bool:
        """Whether to apply it before a tick holding ``in_tick`` (stream -> entry), newest ``newest``."""
        mine = in_tick.get(self.stream_id)
        if mine is not None:  # the stream's own order decides
            return self.stream_through is None or mine > self.stream_through
        return newest is not None and (self.input_through is None or newest > self.input_through)

    def due_after(self, answered_through: EntryKey | None) -> bool:
        """Whether every input entry up to its place has been answered."""
        if self.input_through is None:
            return True
        return answered_through is not None and answered_through >= self.input_through


class CommandJournal:
    """The worker's view of the journal: the last record taken in, and the records still to apply."""

    def __init__(self) -> None:
        self.through: str | None = None
        self.pending: list[JournaledCommand] = []

    def appended(self, journal_id: str) -> None:
        """A record written and applied now."""
        self.through = journal_id

    def take(self, entries: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Records read back at restore, after :attr:`through`: each waits for its place."""
        for journal_id, fields in entries:
            self.pending.append(JournaledCommand.from_fields(journal_id, fields))
            self.through = journal_id

    def waits_on(self, stream_id: str) -> bool:
        """Whether a record of ``stream_id`` still waits for its place."""
        return any(c.stream_id == stream_id for c in self.pending)

    def due_before(self, batch: Sequence[Fixation]) -> list[JournaledCommand]:
        """The records to apply, in order, before a tick of ``batch`` (taken out of :attr:`pending`)."""
        in_tick = {f.stream_id: k for f in batch if (k := entry_key(f.entry_id)) is not None}
        newest = max(in_tick.values(), default=None)
        return self._take_due(lambda c: c.due_before(in_tick, newest))

    def due_after(self, answered_through: EntryKey | None) -> list[JournaledCommand]:
        """The records to apply, in order, now that every entry up to ``answered_through`` is answered."""
        return self._take_due(lambda c: c.due_after(answered_through))

    def _take_due(self, due: Any) -> list[JournaledCommand]:
        # A stream's records come in journal order with marks that never decrease, so a record is
        # never due before an earlier one of its stream: taking them in order keeps their order.
        out: list[JournaledCommand] = []
        kept: list[JournaledCommand] = []
        for c in self.pending:
            (out if due(c) else kept).append(c)
        self.pending = kept
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for a checkpoint."""
        return {"through": self.through,
                "pending": [{"journal_id": c.journal_id, **c.fields()} for c in self.pending]}  # fmt: skip

    def load(self, saved: dict[str, Any]) -> None:
        """Take back what :meth:`to_dict` gave."""
        self.through = saved.get("through")
        pending = saved.get("pending", [])
        self.pending = [JournaledCommand.from_fields(str(p["journal_id"]), p) for p in pending]
