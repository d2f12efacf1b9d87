"""foveate's one exception hierarchy, and the table that maps each class to an HTTP status.

This module imports no web framework, so the worker and the brokers can raise and report these
errors without FastAPI; the handlers that turn them into HTTP answers are in service/api/errors.py.

Every error foveate raises on purpose derives from ``learner.errors.FoveateError``. The tree, with the
HTTP status the API answers and the ``reason`` label counted in ``foveate_rejected_requests_total``::

    FoveateError                        root (learner.errors); never raised itself
    ├── ConfigError                     a setting or ModelConfig value out of range     422 bad_input
    ├── StateFull                       the state memory cap, found inside a tick       429 too_many_streams
    ├── InputError                      bad fixation data or request                    422 bad_input
    │   ├── PatchError                  undecodable image, wrong shape/channels, NaN    422 bad_input
    │   ├── MalformedRequest            body is not JSON / not multipart as declared    400 malformed
    │   ├── PayloadTooLarge             body, image pixels or batch over a limit        413 too_large
    │   ├── UnsupportedMediaType        a body that is not application/json (or form)   415 media_type
    │   └── BodyTimeout                 the body took over ``body_timeout_s`` to arrive 408 timeout
    ├── TrunkWeightsError               trunk weights missing or unreadable             500 internal
    ├── CheckpointError                 a checkpoint cannot be read or written          500 internal
    │   └── ArchitectureMismatch        checkpoint of another architecture              500 internal
    ├── DistributedError                worker ranks disagree (learner.distributed)     500 internal
    │   └── RankLost                    another worker rank exited or stalled           500 internal
    └── ServiceError                    the service cannot take or answer the request
        ├── Unauthorized                no API key, or one that is unknown or revoked   401 unauthorized
        ├── Forbidden                   the key lacks the scope, or a foreign Origin    403 forbidden
        ├── UnknownStream               no such stream on the worker (or another key's) 404 unknown_stream
        ├── Overloaded                  back-pressure; retry later                      429 overloaded
        │   ├── QueueFull               too many fixations waiting for the worker       429 queue_full
        │   ├── TooManyStreams          ``max_streams``, the key's quota or the state   429 too_many_streams
        │   │                           memory cap (``max_state_mb``) reached
        │   └── RateLimited             the key sent more than ``rate_limit_per_s``     429 rate_limited
        ├── WorkerUnavailable           no live worker, or the broker is unreachable    503 unavailable
        ├── WorkerTimeout               no result within ``sync_timeout_s``             504 timeout
        └── WorkerError                 the worker failed on valid input (a bug)        500 internal

Through those handlers (service/api/errors.py), FastAPI's own ``RequestValidationError`` (a field
missing or of the wrong type, a stream id that does not match ``^[A-Za-z0-9_.:-]{1,128}$``) answers
422 as ``InputError``; a body that is not valid JSON answers **400** as ``MalformedRequest``; an
unknown route 404, a wrong method 405, and an unexpected failure (a bug) 500 as ``InternalError``. A
client that disconnects before its answer is counted with status 499 and logged at DEBUG (it is not a
server error). A 401 carries ``WWW-Authenticate: Bearer``; every 429 and 503 carries ``Retry-After``
(whole seconds; see :func:`error_headers`). Every error body has one shape::

    {"error": "<class name>", "detail": "<what to fix>"}

The same two fields travel in worker results over Redis, so the API re-raises the worker's class
(:func:`error_from_payload`).
"""

from __future__ import annotations

import math
from typing import Any

from learner.errors import (
    ArchitectureMismatch,
    CheckpointError,
    ConfigError,
    FoveateError,
    InputError,
    PatchError,
    StateFull,
    TrunkWeightsError,
)

__all__ = [
    "ArchitectureMismatch",
    "BodyTimeout",
    "CheckpointError",
    "ConfigError",
    "Forbidden",
    "FoveateError",
    "InputError",
    "MalformedRequest",
    "Overloaded",
    "PatchError",
    "PayloadTooLarge",
    "QueueFull",
    "RateLimited",
    "ServiceError",
    "TooManyStreams",
    "TrunkWeightsError",
    "Unauthorized",
    "UnknownStream",
    "UnsupportedMediaType",
    "WorkerError",
    "WorkerTimeout",
    "WorkerUnavailable",
]


class MalformedRequest(InputError):
    """The body is not what its Content-Type says (invalid JSON, broken multipart)."""


class PayloadTooLarge(InputError):
    """A body, an image's pixel count or a batch is over its configured limit."""


class UnsupportedMediaType(InputError):
    """A body sent as something other than ``application/json`` (or ``multipart/form-data`` where a
    route takes files): browsers send such "simple" requests cross-origin without asking first."""


class BodyTimeout(InputError):
    """The request's body did not arrive within ``FOVEATE_BODY_TIMEOUT_S``."""


class ServiceError(FoveateError):
    """The service cannot take or answer a request that is itself fine."""


class Unauthorized(ServiceError):
    """No API key, or a key the server does not know (mistyped, revoked)."""


class Forbidden(ServiceError):
    """The key is valid but lacks the route's scope, or a browser sent the request from a foreign origin."""


class UnknownStream(ServiceError, LookupError):
    """No stream of that id lives on the worker."""


class Overloaded(ServiceError):
    """Back-pressure: the request was refused before it was queued; retry after ``retry_after`` s."""

    def __init__(self, detail: str = "", retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after  # seconds, when known: sent as Retry-After


class QueueFull(Overloaded):
    """Too many fixations are waiting for the worker (``FOVEATE_MAX_QUEUE``)."""


class TooManyStreams(Overloaded):
    """The worker already holds ``FOVEATE_MAX_STREAMS`` streams; delete some first."""


class RateLimited(Overloaded):
    """The key sent more requests than ``FOVEATE_RATE_LIMIT_PER_S`` allows."""


class WorkerUnavailable(ServiceError):
    """No live worker answers, or the broker (Redis) cannot be reached."""


class WorkerTimeout(ServiceError):
    """The worker did not answer within ``FOVEATE_SYNC_TIMEOUT_S``; the fixation may still be applied."""


class WorkerError(ServiceError):
    """The worker failed on a request that passed validation: a bug, logged with its traceback."""


# (status, reason) per class; a class not listed takes its nearest listed ancestor's entry.
_STATUS: dict[type[FoveateError], tuple[int, str]] = {
    FoveateError: (500, "internal"),
    ConfigError: (422, "bad_input"),
    InputError: (422, "bad_input"),
    MalformedRequest: (400, "malformed"),
    PayloadTooLarge: (413, "too_large"),
    UnsupportedMediaType: (415, "media_type"),
    BodyTimeout: (408, "timeout"),
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    UnknownStream: (404, "unknown_stream"),
    Overloaded: (429, "overloaded"),
    QueueFull: (429, "queue_full"),
    TooManyStreams: (429, "too_many_streams"),
    RateLimited: (429, "rate_limited"),
    StateFull: (429, "too_many_streams"),
    WorkerUnavailable: (503, "unavailable"),
    WorkerTimeout: (504, "timeout"),
}


def status_of(exc_type: type[FoveateError]) -> tuple[int, str]:
    """HTTP status and metrics ``reason`` for an exception class (by its nearest listed ancestor)."""
    for klass in exc_type.__mro__:
        if klass in _STATUS:
            return _STATUS[klass]
    return _STATUS[FoveateError]


def _all_classes() -> dict[str, type[FoveateError]]:
    """The service's error classes by name. The SDK's classes (clients.sdk.errors) derive from the
    same root and share some names (``UnknownStream``, ``QueueFull``), so only the learner's and the
    service's own modules count: a worker's ``UnknownStream`` must become the 404 class, not the
    SDK's, whatever else the process has imported."""
    found: dict[str, type[FoveateError]] = {}
    pending: list[type[FoveateError]] = [FoveateError]
    while pending:
        klass = pending.pop()
        if klass.__module__.split(".")[0] in ("learner", "service"):
            found[klass.__name__] = klass
        pending.extend(klass.__subclasses__())
    return found


def error_payload(exc: FoveateError) -> dict[str, str]:
    """The ``{"error", "detail"}`` body for an exception."""
    return {"error": type(exc).__name__, "detail": str(exc)}


def error_from_payload(payload: dict[str, Any]) -> FoveateError:
    """Rebuild the exception a worker reported (``{"error": name, "detail": text}``).

    An unknown class name becomes a :class:`WorkerError` that names it.
    """
    name = str(payload.get("error", "WorkerError"))
    detail = str(payload.get("detail", ""))
    klass = _all_classes().get(name)
    if klass is None:
        return WorkerError(f"{name}: {detail}")
    return klass(detail)


RETRY_AFTER_S = 1  # what a refused new stream (429 too_many_streams) is told to wait before it retries
UNAVAILABLE_RETRY_S = 5  # 503: a worker restarting, or Redis coming back, takes seconds, not minutes


def retry_after_header(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds, at least 1 (the header takes no fractions)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def error_headers(exc: FoveateError) -> dict[str, str]:
    """The headers an error answer carries: ``Retry-After`` on every 429 and 503 (the wait the
    exception knows, else a default), ``WWW-Authenticate`` on 401."""
    if isinstance(exc, Overloaded) and exc.retry_after is not None:
        return retry_after_header(exc.retry_after)
    if isinstance(exc, (Overloaded, StateFull)):  # a refused new stream: slots free up as streams go
        return retry_after_header(RETRY_AFTER_S)
    if isinstance(exc, WorkerUnavailable):
        return retry_after_header(UNAVAILABLE_RETRY_S)
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": 'Bearer realm="foveate"'}
    return {}
