"""``StreamRecord``: what the worker keeps about each stream beside the learner's own state.

The learner holds h, c, traces and step counts; the record holds the service's bookkeeping: the
client's last sequence number and timestamp, the Redis entry id of the last applied message (so
that a re-delivered entry is never applied twice), error statistics, and wall-clock times. Records
travel inside every checkpoint's ``extra`` as plain types.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

#: Weight of the newest error in ``running_error`` (an exponential moving average).
RUNNING_ALPHA = 0.1
#: Recent (step, error) pairs kept per stream for ``GET /v1/streams/{id}``.
RECENT = 20


def entry_key(entry_id: str | None) -> tuple[int, int] | None:
    """A Redis stream entry id ``"ms-seq"`` as a comparable tuple; ``None`` for other ids."""
    if not entry_id:
        return None
    ms, _, seq = entry_id.partition("-")
    if not (ms.isdigit() and seq.isdigit()):
        return None
    return int(ms), int(seq)


@dataclass
class StreamRecord:
    """Service-side facts about one stream.

    Examples
    --------
    >>> rec = StreamRecord("s1")
    >>> rec.observe(step=2, error=0.5, seq=7, t=1.5, entry_id="1700000000000-0")
    >>> rec.running_error, rec.last_seq
    (0.5, 7)
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
    recent: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=RECENT))

    def observe(
        self, *, step: int, error: float, seq: int | None, t: float | None, entry_id: str | None
    ) -> None:
        """Record one applied fixation (``error`` NaN when nothing was predicted)."""
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
            self.last_error = None
            return
        self.scored += 1
        self.error_sum += error
        self.last_error = error
        prev = self.running_error
        self.running_error = error if prev is None else prev + RUNNING_ALPHA * (error - prev)
        self.recent.append((step, error))

    def is_replay(self, entry_id: str | None) -> bool:
        """True when a Redis entry at or before the last applied one comes again (a re-delivery)."""
        new, last = entry_key(entry_id), entry_key(self.last_entry_id)
        return new is not None and last is not None and new <= last

    @property
    def mean_error(self) -> float | None:
        return self.error_sum / self.scored if self.scored else None

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
            "last_t": self.last_t,
            "last_entry_id": self.last_entry_id,
            "recent_errors": [{"step": s, "error": e} for s, e in self.recent],
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for a checkpoint's ``extra``."""
        out = {k: v for k, v in self.__dict__.items() if k != "recent"}
        out["recent"] = [list(pair) for pair in self.recent]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "recent"}
        rec = cls(**known)
        rec.recent.extend((int(s), float(e)) for s, e in data.get("recent", []))
        return rec
