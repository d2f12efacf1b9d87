"""Per-key quotas: a request rate (token bucket) and the live streams of a key's namespace.

Both answer 429 with ``Retry-After`` when exceeded (``RateLimited``, ``TooManyStreams``).

The stream quota is kept by the API without asking the worker on every request: it remembers the
streams each namespace has used, and only when a new stream would pass the quota does it ask the
worker for the namespace's real list (a stream deleted or never created because its image was bad
is then forgotten). With several API processes each counts on its own, so the quota holds per API.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable

from service.errors import RateLimited, TooManyStreams


class RateLimiter:
    """One token bucket per key: ``burst`` requests at once, refilled at ``per_s`` a second.

    Examples
    --------
    >>> limiter = RateLimiter(per_s=1.0, burst=2)
    >>> limiter.take("k", now=0.0), limiter.take("k", now=0.0)
    (0.0, 0.0)
    >>> limiter.take("k", now=0.0)   # empty: retry in 1 s
    1.0
    """

    def __init__(self, per_s: float, burst: int) -> None:
        self.per_s = per_s
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, now: float | None = None) -> float:
        """Take one token; 0.0 when granted, else the seconds until one is available."""
        if self.per_s <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_s)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.per_s

    def check(self, key: str, who: str) -> None:
        """Take a token or raise ``RateLimited``."""
        wait = self.take(key)
        if wait > 0:
            raise RateLimited(
                f"{who} sent more than {self.per_s:g} requests a second (FOVEATE_RATE_LIMIT_PER_S, burst "
                f"FOVEATE_RATE_LIMIT_BURST={self.burst}); retry after {math.ceil(wait)} s or batch fixations",
                retry_after=wait,
            )


#: Asks the worker for the qualified ids of a namespace's live streams.
ListStreams = Callable[[str], Awaitable[Iterable[str]]]


class StreamQuota:
    """At most ``limit`` live streams per namespace (see the module docstring)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._known: dict[str, set[str]] = {}

    async def admit(self, namespace: str, stream_ids: Iterable[str], list_streams: ListStreams) -> None:
        """Let fixations of these qualified stream ids through, or raise ``TooManyStreams``."""
        known = self._known.setdefault(namespace, set())
        new = set(stream_ids) - known
        if not new:
            return
        if len(known) + len(new) > self.limit:
            known.clear()
            known.update(await list_streams(namespace))
            new -= known
            if len(known) + len(new) > self.limit:
                raise TooManyStreams(
                    f"namespace {namespace!r} holds {len(known)} streams and this request opens {len(new)} "
                    f"more, over its quota of {self.limit} (FOVEATE_MAX_STREAMS_PER_KEY); delete idle "
                    "streams first",
                    retry_after=60.0,
                )
        known.update(new)

    def forget(self, namespace: str, stream_id: str) -> None:
        """A stream was deleted."""
        self._known.get(namespace, set()).discard(stream_id)
