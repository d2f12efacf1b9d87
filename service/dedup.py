"""Exactly once per ``(stream_id, seq)``: which fixations the worker applies, and what it answers retries.

A client numbers each stream's fixations with ``seq`` (0, 1, 2, …). The worker keeps, per stream, the
last applied ``seq`` and the results of the last :data:`CACHE_SIZE` fixations that carried one, and
decides for each arriving fixation (:func:`decide`):

=================================================  ===========================================
the fixation                                        what happens
=================================================  ===========================================
no ``seq``                                          applied (no de-duplication: older clients)
first of the stream, or ``seq`` > last applied      applied; ``gap`` = seqs skipped since the last
``seq`` <= last, cached, same image                 ``duplicate``: the original result, not applied
``seq`` <= last, cached, other image, ``reset``     a new run: applied, numbering starts again here
``seq`` <= last, cached, other image, no ``reset``  rejected (``InputError``): the seq was reused
``seq`` <= last, not cached, ``reset``              a new run: applied, numbering starts again here
``seq`` <= last, skipped by a gap, no ``reset``     ``late``: not applied (seqs apply in order)
``seq`` <= last, older than the cache, no ``reset`` ``already_applied``: not applied, no scores
=================================================  ===========================================

*Skipped by a gap* is told from *older than the cache* by the cache itself: it holds every seq applied
since the stream's numbering started (a reset or a new run clears it) until it is full, and after that
the last :data:`CACHE_SIZE`, whose seqs rise. A seq not in it that is above its oldest one, or any seq
not in it while it is not full, was never applied: it arrived after a later one (its gap was reported
then) and is answered ``late``. Only a seq below a full cache's oldest is ``already_applied``.

A retry carries the same image, so it is a ``duplicate`` whether or not it asked for a reset; a
client that starts a new run on the same stream (a restarted bridge, numbering from 0 again) sends
``reset`` with a new image and is applied. The image is compared by a 64-bit hash of the decoded patch
(:func:`fingerprint`). The reset route (``POST /v1/streams/{id}/reset``) forgets the stream's seq and
cache, so any ``seq`` is applied after it.

Why a ring of numpy rows, not a dict per stream: 64 results of each of 10,000 streams as Python
objects would take about 200 MB; as fixed arrays they take 4 kB a stream.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

#: Results kept per stream to answer retries with (a client retries its latest few fixations).
CACHE_SIZE = 64

_INTS = ("seq", "fingerprint", "step", "updates_applied", "gap")
_FLOATS = ("error", "repeat_error", "running_error")


def fingerprint(patch: np.ndarray) -> int:
    """A 64-bit hash of a decoded patch (its shape and pixels): equal for a retry of the same image.

    >>> fingerprint(np.zeros((2, 2, 3), np.uint8)) == fingerprint(np.zeros((2, 2, 3), np.uint8))
    True
    """
    digest = hashlib.blake2b(repr(patch.shape).encode(), digest_size=8)
    digest.update(np.ascontiguousarray(patch).data)
    return int.from_bytes(digest.digest(), "little", signed=True)


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _none(value: float) -> float | None:
    return None if math.isnan(value) else value


class ResultCache:
    """The results of a stream's last ``size`` applied fixations that carried a ``seq``.

    Rows are written in the order applied, so their ``seq`` increase (a new run clears the cache).

    Examples
    --------
    >>> cache = ResultCache()
    >>> cache.put({"seq": 3, "fingerprint": 7, "step": 4, "updates_applied": 9, "gap": 0,
    ...            "error": 0.5, "repeat_error": 0.25, "running_error": 0.5, "skipped": False})
    >>> cache.get(3)["step"], cache.get(2)
    (4, None)
    """

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._ints: np.ndarray | None = None  # (size, 5) int64, allocated at the first put
        self._floats: np.ndarray | None = None  # (size, 3) float64, NaN for None
        self._skipped: np.ndarray | None = None  # (size,) bool
        self._written = 0  # rows ever written since the last clear; row i lives at i % size

    def __len__(self) -> int:
        return min(self._written, self.size)

    def clear(self) -> None:
        self._ints = self._floats = self._skipped = None
        self._written = 0

    def put(self, result: dict[str, Any]) -> None:
        """Keep one result: ``seq``, ``fingerprint``, ``step``, ``updates_applied``, ``gap``, ``error``,
        ``repeat_error``, ``running_error`` (None allowed for the last three) and ``skipped``."""
        if self._ints is None:
            self._ints = np.zeros((self.size, len(_INTS)), np.int64)
            self._floats = np.zeros((self.size, len(_FLOATS)), np.float64)
            self._skipped = np.zeros(self.size, np.bool_)
        assert self._floats is not None and self._skipped is not None
        row = self._written % self.size
        self._ints[row] = [int(result[k]) for k in _INTS]
        self._floats[row] = [_nan(result[k]) for k in _FLOATS]
        self._skipped[row] = bool(result["skipped"])
        self._written += 1

    def never_applied(self, seq: int) -> bool:
        """Whether a ``seq`` this cache does not hold was never applied (see the module docstring):
        the cache is not full, or ``seq`` is above the oldest seq it holds."""
        if len(self) < self.size:
            return True
        assert self._ints is not None
        oldest = int(self._ints[self._written % self.size, 0])  # full: the next row to overwrite
        return seq > oldest

    def get(self, seq: int) -> dict[str, Any] | None:
        """The result kept for ``seq``, or None when it is not (any more) in the cache."""
        if self._ints is None:
            return None
        assert self._floats is not None and self._skipped is not None
        n = len(self)
        hits = np.flatnonzero(self._ints[:n, 0] == seq)
        if not hits.size:
            return None
        row = int(hits[-1])
        out: dict[str, Any] = {k: int(v) for k, v in zip(_INTS, self._ints[row].tolist(), strict=True)}
        out.update({k: _none(v) for k, v in zip(_FLOATS, self._floats[row].tolist(), strict=True)})
        out["skipped"] = bool(self._skipped[row])
        return out

    def to_list(self) -> list[list[Any]]:
        """The rows, oldest first, as plain lists (for a checkpoint)."""
        if self._ints is None:
            return []
        assert self._floats is not None and self._skipped is not None
        order = [(self._written - len(self) + i) % self.size for i in range(len(self))]
        return [[*self._ints[r].tolist(), *self._floats[r].tolist(), bool(self._skipped[r])] for r in order]

    @classmethod
    def from_list(cls, rows: list[list[Any]], size: int = CACHE_SIZE) -> ResultCache:
        cache = cls(size)
        for row in rows[-size:]:
            ints, floats = row[: len(_INTS)], row[len(_INTS) : len(_INTS) + len(_FLOATS)]
            result: dict[str, Any] = dict(zip(_INTS, ints, strict=True))
            result.update(dict(zip(_FLOATS, floats, strict=True)))
            result["skipped"] = row[-1]
            cache.put(result)
        return cache


Action = Literal["apply", "duplicate", "late", "already_applied", "reused"]


@dataclass(frozen=True)
class Decision:
    """What to do with one fixation: ``action``; for ``apply`` the ``gap`` before it and whether it
    starts a ``new_run`` of numbering; for ``duplicate`` the ``original`` result."""

    action: Action
    gap: int = 0
    new_run: bool = False
    original: dict[str, Any] | None = None


APPLY = Decision("apply")


def decide(
    last_seq: int | None, cache: ResultCache, seq: int | None, print_: int | None, reset: bool
) -> Decision:
    """The rule of the module docstring for a fixation ``seq`` with image fingerprint ``print_``.

    >>> cache = ResultCache()
    >>> decide(None, cache, 0, 1, False), decide(4, cache, 7, 1, False).gap
    (Decision(action='apply', gap=0, new_run=False, original=None), 2)
    >>> decide(4, cache, 3, 1, False).action, decide(4, cache, 3, 1, True).new_run
    ('late', True)
    """
    if seq is None or last_seq is None:
        return APPLY
    if seq > last_seq:
        return Decision("apply", gap=seq - last_seq - 1)
    original = cache.get(seq)
    if original is not None and original["fingerprint"] == print_:
        return Decision("duplicate", original=original)
    if reset:
        return Decision("apply", new_run=True)
    if original is not None:
        return Decision("reused")
    return Decision("late" if cache.never_applied(seq) else "already_applied")
