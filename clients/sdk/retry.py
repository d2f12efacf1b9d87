"""Retries: which failures are retried, and how long to wait (exponential backoff, jitter, Retry-After).

Shared by both clients; :func:`next_retry` decides, the client sleeps (``time.sleep`` or
``asyncio.sleep``) and sends again.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from dataclasses import dataclass, field

import httpx

from clients.sdk import errors

__all__ = ["NO_RETRY", "RetryEvent", "RetryPolicy", "next_retry", "parse_retry_after", "transport_error"]


@dataclass(frozen=True)
class RetryEvent:
    """Passed to ``on_retry`` before each wait: what failed and how long the client will wait."""

    method: str
    url: str
    attempt: int  # 1 for the first retry
    delay: float  # seconds
    reason: str  # "HTTP 429 QueueFull", "ConnectError: ..."
    retry_after: float | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to retry.

    Retried: answers with a status in ``statuses`` (429 back-pressure, 503 no worker; the server
    refused these before queueing anything), and connection failures (the request never left).
    Timeouts and dropped connections (the server may have acted on the request) are retried only
    for requests that are safe to repeat: GETs, and fixations that carry a ``seq``, which the
    worker applies once however often they arrive (the same body, so the same seq, is sent again).

    The wait before retry ``k`` (1, 2, ...) is ``min(max_backoff, backoff * 2**(k-1))`` scaled by a
    random factor in ``[1 - jitter, 1]`` (so that many clients refused together do not come back
    together), or the server's ``Retry-After`` (seconds or an HTTP date) when it sends one, capped
    at ``max_retry_after``. The client gives up (raising the last error) after ``max_retries``
    retries, or when the next wait would take the waits' total past ``max_total_wait``.

    Examples
    --------
    >>> policy = RetryPolicy(backoff=0.1, jitter=0.0)
    >>> [policy.delay(k) for k in (1, 2, 3)]
    [0.1, 0.2, 0.4]
    >>> policy.delay(1, retry_after=2.0)
    2.0
    """

    max_retries: int = 5
    backoff: float = 0.1
    max_backoff: float = 5.0
    jitter: float = 0.5
    max_retry_after: float = 60.0
    max_total_wait: float = 120.0
    statuses: frozenset[int] = frozenset({429, 503})
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        waits = (self.backoff, self.max_backoff, self.max_retry_after, self.max_total_wait)
        if not all(w >= 0 for w in waits):
            raise ValueError("backoff, max_backoff, max_retry_after and max_total_wait must be >= 0 seconds")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1 for the first)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        base = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        return base * (1.0 - self.jitter * self.rng.random())


#: No retries at all.
NO_RETRY = RetryPolicy(max_retries=0)


def parse_retry_after(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (it may be a number or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None  # neither seconds nor a date: ignore it, use the backoff
        return max(0.0, when.timestamp() - time.time())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def transport_error(exc: httpx.TransportError, request: httpx.Request) -> errors.TransportError:
    """The SDK error for an httpx transport failure."""
    where = f"{request.method} {request.url}"
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return errors.ConnectError(
            f"cannot connect for {where}: {exc}; is the server running at that address?"
        )
    if isinstance(exc, httpx.TimeoutException):
        return errors.RequestTimeout(
            f"no answer to {where} within the client's timeout ({type(exc).__name__})"
        )
    return errors.TransportError(f"{where} failed: {type(exc).__name__}: {exc}")


def retryable_transport(exc: httpx.TransportError, safe_to_repeat: bool) -> bool:
    """Connection failures always (nothing was sent); others (a timeout, a connection dropped by a
    server that died mid-request) only for a request that is safe to repeat: it may have been acted on."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return True
    return safe_to_repeat


def _reason(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    name = body.get("error", "") if isinstance(body, dict) else ""
    return f"HTTP {response.status_code} {name}".strip()


def next_retry(
    policy: RetryPolicy,
    request: httpx.Request,
    attempt: int,
    *,
    response: httpx.Response | None = None,
    exc: httpx.TransportError | None = None,
    safe_to_repeat: bool | None = None,
    waited: float = 0.0,
) -> RetryEvent | None:
    """The retry to make after ``attempt`` retries already made, or None to stop here.

    Give the ``response`` (retried when its status is in ``policy.statuses``) or the transport
    ``exc`` (retried when :func:`retryable_transport`; ``safe_to_repeat`` defaults to "is a GET"),
    and the seconds ``waited`` before the earlier retries.
    """
    if attempt >= policy.max_retries:
        return None
    retry_after: float | None = None
    if exc is not None:
        repeatable = request.method == "GET" if safe_to_repeat is None else safe_to_repeat
        if not retryable_transport(exc, repeatable):
            return None
        reason = f"{type(exc).__name__}: {exc}"
    else:
        assert response is not None
        if response.status_code not in policy.statuses:
            return None
        retry_after = parse_retry_after(response)
        reason = _reason(response)
    delay = policy.delay(attempt + 1, retry_after)
    if waited + delay > policy.max_total_wait:
        return None
    return RetryEvent(request.method, str(request.url), attempt + 1, delay, reason, retry_after)
