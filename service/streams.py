"""``StreamRecord``: what the worker keeps about each stream beside the learner's own state.

The learner holds h, c, traces and step counts; the record holds the service's bookkeeping: the
client's last sequence number and the results of its last fixations (service/dedup.py: a retry is
answered with its original result, never applied twice), the last timestamp, the Redis entry id of
the last applied message (so that a re-delivered entry is never applied twice), error statistics
(the model's, and the repeat baseline's: predicting the next embedding to be the current one), and
wall-clock times. Records
travel inside every checkpoint's ``extra`` as plain types.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from service.dedup import ResultCache
from service.running_stats import skill

#: Weight of the newest error in ``running_error`` (an exponential moving average).
RUNNING_ALPHA = 0.1
#: Recent (step, error, repeat error) triples kept per stream for ``GET /v1/streams/{id}``.
RECENT = 20


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


EntryKey = tuple[int, int]

#: The largest sequence part of a Redis stream entry id.
_MAX_ENTRY_SEQ = 2**64 - 1


def entry_key(entry_id: str | None) -> EntryKey | None:
    """A Redis stream entry id ``"ms-seq"`` as a comparable tuple; ``None`` for other ids."""
    if not entry_id:
        return None
    ms, _, seq = entry_id.partition("-")
    if not (ms.isdigit() and seq.isdigit()):
        return None
    return int(ms), int(seq)


def entry_text(key: EntryKey) -> str:
    """The Redis entry id of a key: ``entry_text(entry_key(x)) == x``."""
    return f"{key[0]}-{key[1]}"


def entry_before(key: EntryKey) -> EntryKey:
    """The greatest entry id below ``key`` (``0-0`` stays ``0-0``): "every entry before this one".

    >>> entry_before((1700000000000, 0)), entry_before((5, 3))
    ((1699999999999, 18446744073709551615), (5, 2))
    """
    ms, seq = key
    if seq:
        return ms, seq - 1
    return (ms - 1, _MAX_ENTRY_SEQ) if ms else (0, 0)


class Tombstones:
    """Deleted streams, each with the last entry id it applied: a Redis entry re-read after a restart
    must not bring a deleted stream back. The newest ``limit`` deletions are kept.

    Examples
    --------
    >>> graves = Tombstones()
    >>> graves.bury("a", "7-0")
    >>> graves.covers("a", "6-3"), graves.covers("a", "8-0"), graves.covers("b", "1-0")
    (True, False, False)
    """

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._last: dict[str, EntryKey] = {}

    def bury(self, stream_id: str, last_entry_id: str | None) -> None:
        key = entry_key(last_entry_id)
        if key is not None:  # a stream fed over HTTP only has nothing to re-read
            self._last[stream_id] = key
            if len(self._last) > self.limit:
                del self._last[next(iter(self._last))]

    def lift(self, stream_id: str) -> None:
        """The stream is back (new fixations after its deletion)."""
        self._last.pop(stream_id, None)

    def covers(self, stream_id: str, entry_id: str | None) -> bool:
        """Whether ``entry_id`` of ``stream_id`` was applied before the stream was deleted."""
        gone, key = self._last.get(stream_id), entry_key(entry_id)
        return gone is not None and key is not None and key <= gone

    def to_dict(self) -> dict[str, str]:
        return {sid: entry_text(key) for sid, key in self._last.items()}

    def load(self, saved: dict[str, str]) -> None:
        """Take back what :meth:`to_dict` gave (in a checkpoint)."""
        keys = {sid: entry_key(eid) for sid, eid in saved.items()}
        self._last = {sid: key for sid, key in keys.items() if key is not None}


class InputOffset:
    """The worker's input offset over Redis: the greatest entry id up to which every entry it has
    read has been answered. A checkpoint saves it; a restarted worker re-reads every entry after it.

    Entries arrive in id order (the broker reads them so), so everything below the oldest entry still
    open (received, not answered yet) has been answered; stale entries claimed late are below the
    offset already. Fixations without an entry id (HTTP on the in-process broker) leave it alone.

    Examples
    --------
    >>> offset = InputOffset("5-3")
    >>> offset.opened("5-4"); offset.opened("5-5")
    >>> offset.answered(["5-5"]); offset.text  # 5-4 is still open
    '5-3'
    >>> offset.answered(["5-4"]); offset.text
    '5-5'
    """

    def __init__(self, start: str | None = None) -> None:
        self.through = entry_key(start)  # None: no Redis offset (no replaying broker)
        self._open: set[EntryKey] = set()
        self._answered_max: EntryKey | None = None

    @property
    def text(self) -> str | None:
        return None if self.through is None else entry_text(self.through)

    def opened(self, entry_id: str | None) -> None:
        key = entry_key(entry_id)
        if key is not None:
            self._open.add(key)

    def answered(self, entry_ids: list[str | None]) -> None:
        """Advance past the entries just answered."""
        for entry_id in entry_ids:
            key = entry_key(entry_id)
            if key is not None:
                self._open.discard(key)
                if self._answered_max is None or key > self._answered_max:
                    self._answered_max = key
        done = entry_before(min(self._open)) if self._open else self._answered_max
        if done is not None and (self.through is None or done > self.through):
            self.through = done


@dataclass
class StreamRecord:
    """Service-side facts about one stream.

    Examples
    --------
    >>> rec = StreamRecord("s1")
    >>> rec.observe(step=2, error=0.5, seq=7, t=1.5, entry_id="1700000000000-0", repeat_error=0.5)
    >>> rec.running_error, rec.last_seq, rec.skill  # skill 0: no better than repeating
    (0.5, 7, 0.0)
    """

    stream_id: str
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    step: int = 0
    fixations: int = 0
    scored: int = 0
    resets: int = 0
    error_sum: float = 0.0
    running_error: float | None = None
    last_error: float | None = None
    last_seq: int | None = None
    last_t: float | None = None
    last_entry_id: str | None = None
    #: the greatest entry id of the stream taken into a tick, applied or not: a journal record's place
    last_read_entry_id: str | None = None
    repeat_scored: int = 0  # scored fixations with a repeat error (all, unless restored from an old record)
    repeat_error_sum: float = 0.0
    paired_error_sum: float = 0.0  # the model's errors on those same fixations
    last_repeat_error: float | None = None
    skipped: int = 0  # scored fixations the learner did not learn from (ill-conditioned)
    recent: deque[tuple[int, float, float | None]] = field(default_factory=lambda: deque(maxlen=RECENT))
    #: results of the last fixations with a seq, to answer their retries (service/dedup.py)
    results: ResultCache = field(default_factory=ResultCache, repr=False)

    def observe(
        self,
        *,
        step: int,
        error: float,
        seq: int | None,
        t: float | None,
        entry_id: str | None,
        repeat_error: float = math.nan,
        skipped: bool = False,
    ) -> None:
        """Record one applied fixation (``error`` and ``repeat_error`` NaN when nothing was predicted;
        ``skipped``: scored, but not learned from)."""
        self.step = step
        self.fixations += 1
        self.updated_at = time.time()
        if seq is not None:
            self.last_seq = seq
        if t is not None:
            self.last_t = t
        if entry_key(entry_id) is not None:
            self.last_entry_id = entry_id
        if math.isnan(error):
            self.last_error = self.last_repeat_error = None
            return
        self.scored += 1
        self.error_sum += error
        self.last_error = error
        self.last_repeat_error = _number(repeat_error)
        if not math.isnan(repeat_error):
            self.repeat_scored += 1
            self.repeat_error_sum += repeat_error
            self.paired_error_sum += error
        if skipped:
            self.skipped += 1
        prev = self.running_error
        self.running_error = error if prev is None else prev + RUNNING_ALPHA * (error - prev)
        self.recent.append((step, error, self.last_repeat_error))

    def forget_seq(self) -> None:
        """Start the seq numbering afresh (a reset, or a client's new run): any seq is applied next."""
        self.last_seq = None
        self.results.clear()

    def is_replay(self, entry_id: str | None) -> bool:
        """True when a Redis entry at or before the last applied one comes again (a re-delivery)."""
        new, last = entry_key(entry_id), entry_key(self.last_entry_id)
        return new is not None and last is not None and new <= last

    @property
    def mean_error(self) -> float | None:
        return self.error_sum / self.scored if self.scored else None

    @property
    def mean_repeat_error(self) -> float | None:
        return self.repeat_error_sum / self.repeat_scored if self.repeat_scored else None

    @property
    def skill(self) -> float | None:
        """``1 - model error / repeat error`` summed over the stream's scored fixations (None when the
        repeat errors sum to 0 or none was recorded)."""
        return _number(skill(self.paired_error_sum, self.repeat_error_sum)) if self.repeat_scored else None

    def summary(self) -> dict[str, Any]:
        """The short form listed by ``GET /v1/streams``."""
        return {
            "stream_id": self.stream_id,
            "step": self.step,
            "fixations": self.fixations,
            "running_error": self.running_error,
            "last_seq": self.last_seq,
            "updated_at": self.updated_at,
        }

    def info(self) -> dict[str, Any]:
        """Everything, for ``GET /v1/streams/{id}``."""
        return {
            **self.summary(),
            "created_at": self.created_at,
            "scored": self.scored,
            "resets": self.resets,
            "mean_error": self.mean_error,
            "last_error": self.last_error,
            "mean_repeat_error": self.mean_repeat_error,
            "last_repeat_error": self.last_repeat_error,
            "skill": self.skill,
            "skipped": self.skipped,
            "last_t": self.last_t,
            "last_entry_id": self.last_entry_id,
            "recent_errors": [{"step": s, "error": e, "repeat_error": r} for s, e, r in self.recent],
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for a checkpoint's ``extra``."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("recent", "results")}
        out["recent"] = [list(entry) for entry in self.recent]
        out["results"] = self.results.to_list()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamRecord:
        plain = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known = {k: v for k, v in plain.items() if k not in ("recent", "results")}
        rec = cls(**known, results=ResultCache.from_list(data.get("results", [])))
        for entry in data.get("recent", []):  # [step, error] in records saved before repeat errors
            repeat = entry[2] if len(entry) > 2 else None
            rec.recent.append((int(entry[0]), float(entry[1]), None if repeat is None else float(repeat)))
        return rec
