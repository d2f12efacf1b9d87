"""Back-pressure: how fast the worker serves fixations, and what a client is told when it is behind.

A queue that is accepted but cannot be served in time only turns into timeouts: with ~10,000
fixations waiting, every request waited ``sync_timeout_s`` and answered 504 while ``/readyz`` said
ready. So the worker measures its *service rate* (fixations answered per second of tick time: its
capacity, not the current arrival rate) and publishes it with its heartbeat beside the backlog, and
the API turns the two into

- ``/readyz`` 503 while the backlog needs longer than ``sync_timeout_s`` to serve (a load balancer
  then sends new sessions elsewhere), with ``Retry-After`` = the time until it fits again;
- ``Retry-After`` on a 429 ``QueueFull``: the time the worker needs to make room for the request;
- a 429 ``QueueFull`` for a request that would wait for its result (``wait=true``) while the
  backlog already needs longer than ``sync_timeout_s``: it would only time out (504) and still be
  applied later, so it is refused before it is queued, told to come back when the backlog fits.
  The same when the request holds more fixations of one stream than ticks fit in the timeout: a
  stream gets one fixation a tick, so a batch of k needs k ticks however short the backlog (a soak
  of batches of 64 with ticks of ~0.5 s answered most of its overload 504 before this).

Examples
--------
>>> rate = ServiceRate()
>>> rate.observe(64, 0.5)
>>> rate.per_second()
128.0
>>> drain_seconds(256, 128.0)
2.0
>>> overdue(backlog=2560, rate=128.0, timeout_s=10.0)
10.0
>>> overdue(backlog=256, rate=128.0, timeout_s=10.0) is None
True
>>> refuse_waiting(0, 40, rate=128.0, timeout_s=10.0, deepest=40, tick_s=0.5)  # 40 ticks of one stream
10.0
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from service.errors import QueueFull

#: Retry-After (s) when the worker's rate is not known yet (nothing served since it started).
UNKNOWN_RATE_RETRY_S = 1.0


class ServiceRate:
    """Fixations served per second of busy time, averaged over about the last ``horizon_s`` of it.

    Busy time (the ticks, not the waits between them) measures what the worker *can* do: a worker
    idling at 5 fixations/s that could serve 500 must not look slow when a burst arrives.
    """

    def __init__(self, horizon_s: float = 10.0) -> None:
        self.horizon_s = horizon_s
        self._served = 0.0  # decayed sums
        self._busy = 0.0
        self._ticks = 0.0

    def observe(self, served: int, seconds: float) -> None:
        """``served`` fixations answered in a tick that took ``seconds``."""
        keep = math.exp(-seconds / self.horizon_s)  # older ticks weigh less, by busy time elapsed
        self._served = self._served * keep + served
        self._busy = self._busy * keep + seconds
        self._ticks = self._ticks * keep + 1.0

    def tick_seconds(self) -> float | None:
        """The mean time of a tick over the same horizon (a stream's k fixations need k ticks), or None
        before the first tick."""
        if self._ticks <= 0.0 or self._busy <= 0.0:
            return None
        return self._busy / self._ticks

    def per_second(self) -> float | None:
        """The rate, or None before anything was served."""
        if self._busy <= 0.0 or self._served <= 0.0:
            return None
        return self._served / self._busy


def drain_seconds(backlog: int, rate: float | None) -> float | None:
    """Seconds the worker needs to serve ``backlog`` fixations at ``rate``; None when the rate is unknown."""
    if rate is None or rate <= 0.0:
        return None
    return backlog / rate


def overdue(backlog: int, rate: float | None, timeout_s: float) -> float | None:
    """By how many seconds serving the backlog overruns ``timeout_s`` (None: it does not, or the rate
    is unknown): a fixation queued now would time out before the worker reached it."""
    need = drain_seconds(backlog, rate)
    if need is None or need <= timeout_s:
        return None
    return need - timeout_s


def refuse_waiting(
    backlog: int,
    count: int,
    rate: float | None,
    timeout_s: float,
    deepest: int = 1,
    tick_s: float | None = None,
) -> float | None:
    """Seconds to come back later, when ``count`` more fixations whose sender waits for the result
    would be served after ``timeout_s``: behind the ``backlog`` at ``rate``, or, ``deepest`` of them
    being of one stream, after that many ticks of ``tick_s``. None when they are admitted (or
    neither the rate nor the tick time is known)."""
    late = overdue(backlog + count, rate, timeout_s)
    if tick_s is not None and deepest * tick_s > timeout_s:
        late = max(late or 0.0, deepest * tick_s - timeout_s)
    return late


def deepest_stream(stream_ids: Iterable[str]) -> tuple[str, int]:
    """The stream with the most fixations in a request, and how many it has."""
    counts = Counter(stream_ids)
    if not counts:
        return "", 0
    return max(counts.items(), key=lambda kv: kv[1])


def late_reason(deepest: tuple[str, int], tick_s: float | None, timeout_s: float) -> str | None:
    """What to tell a client whose request is refused because one stream's fixations in it need more
    ticks than fit in the timeout (None when that is not why)."""
    stream, k = deepest
    if tick_s is None or k * tick_s <= timeout_s:
        return None
    fits = max(1, int(timeout_s / tick_s))
    return (
        f"the request holds {k} fixations of stream {stream!r}, which take one worker tick each (about "
        f"{tick_s:.2f} s now): more than FOVEATE_SYNC_TIMEOUT_S={timeout_s:g} allows; send at most "
        f"{fits} fixations of one stream per waiting request, or send with wait=false"
    )


def queue_full_retry_after(excess: int, rate: float | None) -> float:
    """Retry-After for a refused request: the time to serve the ``excess`` fixations over the limit."""
    need = drain_seconds(max(excess, 1), rate)
    return UNKNOWN_RATE_RETRY_S if need is None else need


def refuse_late(
    fixations: Sequence[Any], backlog: int, rate: float | None, tick_s: float | None, timeout_s: float
) -> None:
    """Raise ``QueueFull`` (429, with ``Retry-After``) for a waiting request the worker would not
    answer within ``timeout_s``: behind the backlog, or because one stream has too many fixations in
    it; the message says which, and what to send instead."""
    deepest = deepest_stream(f.stream_id for f in fixations)
    late = refuse_waiting(backlog, len(fixations), rate, timeout_s, deepest[1], tick_s)
    if late is None:
        return
    why = late_reason(deepest, tick_s, timeout_s) or (
        f"{backlog} fixations are waiting: the worker would not answer within "
        f"FOVEATE_SYNC_TIMEOUT_S={timeout_s:g}; retry later, or send with wait=false"
    )
    raise QueueFull(why, retry_after=late)
