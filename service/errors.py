"""foveate's one exception hierarchy, and the one handler that maps it to HTTP.

Every error foveate raises on purpose derives from ``learner.errors.FoveateError``. The tree, with the
HTTP status the API answers and the ``reason`` label counted in ``foveate_rejected_requests_total``::

    FoveateError                        root (learner.errors); never raised itself
    ├── ConfigError                     a setting or ModelConfig value out of range     422 bad_input
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
    StateFull (learner)                 the memory cap, found inside a tick             429 too_many_streams
        ├── WorkerUnavailable           no live worker, or the broker is unreachable    503 unavailable
        ├── WorkerTimeout               no result within ``sync_timeout_s``             504 timeout
        └── WorkerError                 the worker failed on valid input (a bug)        500 internal

FastAPI's own ``RequestValidationError`` (a field missing or of the wrong type, a stream id that does
not match ``^[A-Za-z0-9_.:-]{1,128}$``) answers 422 as ``InputError``; a body that is not valid JSON
answers **400** as ``MalformedRequest``; an unknown route 404, a wrong method 405, and an
unexpected failure (a bug) 500 as ``InternalError``. A client that disconnects before its answer is
counted with status 499 and logged at DEBUG (it is not a server error). A 401 carries
``WWW-Authenticate: Bearer``; a 429 for a key's rate or stream quota ``Retry-After``. Every error
body has one shape::

    {"error": "<class name>", "detail": "<what to fix>"}

A 429 ``too_many_streams`` also carries ``Retry-After`` (seconds).

The same two fields travel in worker results over Redis, so the API re-raises the worker's class
(:func:`error_from_payload`).
"""

from __future__ import annotations

import json
import logging
import math
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

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
from service import metrics

logger = logging.getLogger(__name__)

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
    found: dict[str, type[FoveateError]] = {}
    pending: list[type[FoveateError]] = [FoveateError]
    while pending:
        klass = pending.pop()
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


def error_headers(exc: FoveateError) -> dict[str, str]:
    """The headers an error answer carries: ``Retry-After`` on 429, ``WWW-Authenticate`` on 401."""
    if isinstance(exc, Overloaded) and exc.retry_after is not None:
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    if isinstance(exc, (TooManyStreams, StateFull)):  # a refused new stream: slots free up as streams go
        return {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": 'Bearer realm="foveate"'}
    return {}


def _respond(
    status: int, reason: str, name: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    metrics.REJECTED_REQUESTS.labels(reason=reason).inc()
    return JSONResponse({"error": name, "detail": detail}, status_code=status, headers=headers)


def error_response(exc: FoveateError) -> JSONResponse:
    """The JSON answer for an exception, counted in ``foveate_rejected_requests_total``."""
    status, reason = status_of(type(exc))
    return _respond(status, reason, type(exc).__name__, str(exc), error_headers(exc))


async def _foveate_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FoveateError)
    status, _ = status_of(type(exc))
    if status >= 500:
        logger.error("%s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
    return error_response(exc)


async def _disconnect_handler(request: Request, exc: Exception) -> Response:
    # The client went away while its body was read: nobody is left to answer, and nothing failed
    # here. 499 (nginx's "client closed request") keeps it apart from server errors in the metrics.
    logger.debug("client disconnected during %s %s", request.method, request.url.path)
    return Response(status_code=499)


def _describe_validation(errors: list[Any]) -> tuple[bool, str]:
    """(is_malformed_json, "loc: message; …") for a list of pydantic error dicts."""
    parts: list[str] = []
    for err in errors[:10]:
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            return (
                True,
                f"request body is not valid JSON ({ctx.get('error', err.get('msg'))}); send a JSON object",
            )
        loc = ".".join(str(part) for part in err.get("loc", ()) if part != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    if len(errors) > 10:
        parts.append(f"... and {len(errors) - 10} more")
    return False, "; ".join(parts)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    malformed, detail = _describe_validation(list(exc.errors()))
    if malformed:
        return _respond(400, "malformed", "MalformedRequest", detail)
    return _respond(422, "bad_input", "InputError", detail)


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    phrase = HTTPStatus(exc.status_code).phrase.title().replace(" ", "").replace("-", "")
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404:
        detail = f"no route {request.method} {request.url.path}; see /docs for the API"
    reason = {404: "no_route", 405: "no_route"}.get(exc.status_code, "bad_input")
    return _respond(exc.status_code, reason, phrase, detail)


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not bad input: keep the body's shape, and let the log carry the traceback.
    logger.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
    return _respond(500, "internal", "InternalError", "unexpected server error; see the server log")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the ``{"error", "detail"}`` shape."""
    app.add_exception_handler(Exception, _unexpected_handler)
    app.add_exception_handler(FoveateError, _foveate_handler)
    app.add_exception_handler(ClientDisconnect, _disconnect_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
