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
stream still sees its commands between the same two of its fixations. Meanwhile a new reset or
delete of a stream whose record still waits is refused (``WorkerUnavailable``: retry), since it
would overtake that record.

:class:`CommandJournal` holds the records and the rule; :class:`JournalDriver` is the worker's side
(write, track the input's place, re-apply), called from the worker's loop under its lock.

Examples
--------
>>> journal = CommandJournal()
>>> journal.take([("7-0", {"command": "reset", "stream_id": "a", "stream_through": "5-0",
...                        "input_through": "6-0"})])
>>> journal.through, journal.due_after((5, 9)), [c.stream_id for c in journal.due_after((6, 0))]
('7-0', [], ['a'])
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from learner.errors import FoveateError
from service import metrics
from service.commands import HANDLERS
from service.errors import WorkerUnavailable
from service.messages import Command, Control, Fixation
from service.streams import EntryKey, entry_key, entry_text

if TYPE_CHECKING:
    from service.worker import Worker

logger = logging.getLogger(__name__)

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

    def take(self, entries: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Records read back at restore, after :attr:`through`: each waits for its place."""
        for journal_id, fields in entries:
            self.pending.append(JournaledCommand.from_fields(journal_id, fields))
            self.through = journal_id

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


class JournalDriver:
    """The worker's side of the journal (see the module docstring): writes a record before each
    reset or delete, tracks where the input stands, and after a restart applies each record at its
    place.

    Parameters
    ----------
    worker
        Whose broker keeps the journal, whose records and command handlers are used, and whose
        input offset says which entries are answered.
    lock
        The worker's tick lock: a record is written and its command applied under it.
    """

    def __init__(self, worker: Worker, lock: threading.Lock) -> None:
        self.worker = worker
        self._lock = lock
        self.journal = CommandJournal()
        self.input_seen: EntryKey | None = None  # the greatest entry id taken into a tick
        self.enabled = False  # a broker that re-reads its input (Redis), and checkpoints

    @property
    def pending(self) -> list[JournaledCommand]:
        return self.journal.pending

    def start(self, *, restored: bool) -> None:
        """Once the broker has started: take the records after the restored checkpoint (or, with
        none restored, skip the records of a checkpoint that is gone), and apply those due."""
        worker = self.worker
        self.enabled = worker.offset.through is not None and worker.settings.checkpoint_path is not None
        if not self.enabled:
            return
        if restored:
            self.journal.take(worker.broker.journal_after(self.journal.through))
        else:
            self.journal.through = worker.broker.journal_last()
        self.input_seen = self.input_seen or worker.offset.through
        self.after_tick()

    def command(self, ctl: Control) -> dict[str, Any]:
        """Write a reset's or delete's record, then apply it: the record first, so that a command
        whose record Redis refused is answered with that error and not applied."""
        sid = str(ctl.args.get("stream_id", ""))
        if any(c.stream_id == sid for c in self.journal.pending):
            raise WorkerUnavailable(
                f"stream {sid[:140]!r} is being re-read after a restart and an earlier reset or "
                "delete of it is not re-applied yet: retry in a second"
            )
        handler = HANDLERS[cast(Command, ctl.command)]
        with self._lock:
            rec = self.worker.records.get(sid)
            if rec is None:
                return handler(self.worker, ctl.args)  # UnknownStream: nothing to journal
            place = JournaledCommand("", ctl.command, sid, entry_key(rec.last_read_entry_id), self.input_seen)
            journal_id = self.worker.broker.journal(place.fields())
            out = handler(self.worker, ctl.args)
            self.journal.through = journal_id
        metrics.JOURNAL_COMMANDS.labels(event="journaled").inc()
        return out

    def before_tick(self, batch: Sequence[Fixation]) -> None:
        """Apply the records due before a tick of ``batch`` (the lock held)."""
        if self.journal.pending:
            self._apply(self.journal.due_before(batch))

    def seen(self, batch: Sequence[Fixation]) -> None:
        """Where each stream, and the input, stand after a tick of ``batch`` (the lock held); only
        the journal reads it, so nothing is done per fixation without one (HTTP, no checkpoints)."""
        if not self.enabled:
            return
        for fix in batch:
            key = entry_key(fix.entry_id)
            if key is None:
                continue
            if self.input_seen is None or key > self.input_seen:
                self.input_seen = key
            rec = self.worker.records.get(fix.stream_id)
            last = None if rec is None else entry_key(rec.last_read_entry_id)
            if rec is not None and (last is None or key > last):
                rec.last_read_entry_id = fix.entry_id

    def after_tick(self) -> None:
        """Apply the records whose input entries are all answered (after a tick, at start)."""
        if self.journal.pending:
            with self._lock:
                self._apply(self.journal.due_after(self.worker.offset.through))

    def _apply(self, due: list[JournaledCommand]) -> None:
        for record in due:
            try:
                HANDLERS[cast(Command, record.command)](self.worker, {"stream_id": record.stream_id})
            except FoveateError as exc:  # the stream's fixations before it were lost (trimmed)
                logger.warning("journaled %s of %r (record %s) could not be applied again: %s",
                               record.command, record.stream_id[:140], record.journal_id, exc)  # fmt: skip
            metrics.JOURNAL_COMMANDS.labels(event="replayed").inc()

    def to_dict(self) -> dict[str, Any]:
        """For a checkpoint: the journal's position, its records not applied yet, the input's place."""
        seen = None if self.input_seen is None else entry_text(self.input_seen)
        return {**self.journal.to_dict(), "input_seen": seen}

    def load(self, saved: dict[str, Any]) -> None:
        self.journal.load(saved)
        self.input_seen = entry_key(saved.get("input_seen"))
