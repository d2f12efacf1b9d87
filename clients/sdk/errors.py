"""The SDK's exceptions: one tree that mirrors the server's error classes.

Every error answer of the API is JSON ``{"error": "<ClassName>", "detail": "<what to fix>"}``; the
SDK raises the class of the same name, so ``except UnknownStream`` works the same on both sides of
the wire. The tree, with the status the server answers (``service/errors.py`` draws the server's);
``[L]`` marks a class that also derives from the ``learner.errors`` class of the same name::

    FoveateError (learner.errors)        root of every error foveate raises, the client side's included
    └── ClientError                      root of everything the SDK raises
        ├── TransportError               no HTTP answer (after the retries)
        │   ├── ConnectError             cannot connect: server down, wrong URL or port
        │   └── RequestTimeout           connected, but no answer within the client's timeout
        ├── ProtocolError                an answer that is not the JSON the API documents
        └── APIError                     the server answered an error status; .status_code, .detail
            ├── RequestRejected          any other 4xx (NotFound for an unknown route, 405, ...)
            │   ├── InputError [L]       422  bad fields or request
            │   │   ├── PatchError [L]   422  undecodable image, wrong shape or channels, gaze off frame
            │   │   ├── MalformedRequest 400  body is not valid JSON
            │   │   ├── PayloadTooLarge  413  body, image or batch over a server limit
            │   │   ├── UnsupportedMediaType  415  a body that is not JSON (or multipart)
            │   │   └── BodyTimeout      408  the body arrived too slowly
            │   ├── ConfigError [L]      422  a server setting out of range (e.g. checkpoints disabled)
            │   ├── Unauthorized         401  no API key, or an unknown or revoked one
            │   ├── Forbidden            403  the key lacks the route's scope
            │   ├── UnknownStream        404  no such stream on the worker (in the key's namespace)
            │   └── Overloaded           429  back-pressure: retried, then raised
            │       ├── QueueFull        429  too many fixations waiting for the worker
            │       ├── TooManyStreams   429  the worker (or the key's namespace) holds its maximum
            │       └── RateLimited      429  the key sent more requests a second than allowed
            └── ServerError              any other 5xx
                ├── WorkerUnavailable    503  no live worker, or Redis unreachable: retried, then raised
                ├── WorkerTimeout        504  no result in time; the fixation may still be applied
                ├── WorkerError          500  the worker failed on valid input (a server bug)
                ├── TrunkWeightsError [L]     500
                └── CheckpointError [L]       500
                    └── ArchitectureMismatch [L]

The tree groups by status, so the server's abstract ``ServiceError`` (whose subclasses span 4xx and
5xx) has no counterpart; every class the server sends has one. An ``error`` name the SDK does not
know becomes :class:`RequestRejected` (4xx) or
:class:`ServerError` (5xx), with the name kept in :attr:`APIError.error`.

Why the ``[L]`` bases: code on the client side (bridges, replay) meets a bad patch in two places, its own
``learner.patches.cut_patch`` and the SDK (a patch it cannot encode, or the server's 422), and a bad
setting likewise; with one family a single ``except PatchError`` (or ``ConfigError``, or the root
``FoveateError`` in a CLI) catches all of them. ``learner.errors`` imports only the standard library
(and ``learner/__init__.py`` imports lazily), so this module still needs nothing but the standard library
and httpx: the SDK runs next to an eye tracker without PyTorch (tests/clients/test_sdk_unit.py checks).
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from learner import errors as learner

__all__ = [
    "APIError",
    "ArchitectureMismatch",
    "BodyTimeout",
    "CheckpointError",
    "ClientError",
    "ConfigError",
    "ConnectError",
    "Forbidden",
    "InputError",
    "MalformedRequest",
    "Overloaded",
    "PatchError",
    "PayloadTooLarge",
    "ProtocolError",
    "QueueFull",
    "RateLimited",
    "RequestRejected",
    "RequestTimeout",
    "ServerError",
    "TooManyStreams",
    "TransportError",
    "TrunkWeightsError",
    "Unauthorized",
    "UnknownStream",
    "UnsupportedMediaType",
    "WorkerError",
    "WorkerTimeout",
    "WorkerUnavailable",
    "error_from_body",
    "error_from_response",
]


class ClientError(learner.FoveateError):
    """Root of every error the SDK raises."""


class TransportError(ClientError):
    """The request got no HTTP answer, after the retries the client's policy allows."""


class ConnectError(TransportError):
    """No connection could be made: the server is down, or the URL or port is wrong."""


class RequestTimeout(TransportError):
    """Connected, but the answer did not come within the client's timeout."""


class ProtocolError(ClientError):
    """The server answered something that is not the JSON the API documents (a proxy's HTML page, say)."""


class APIError(ClientError):
    """The server answered with an error status.

    Attributes
    ----------
    status_code : int
        The HTTP status.
    error : str
        The server's class name (the ``error`` field), also for classes the SDK does not know.
    detail : str
        What to fix, as the server wrote it.
    response : httpx.Response or None
        The response, for its headers (None for an error reported inside a batch answer).
    """

    def __init__(
        self,
        detail: str,
        *,
        status_code: int = 0,
        error: str | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status_code = status_code
        self.error = error or type(self).__name__
        self.response = response

    def __str__(self) -> str:
        named = f"{self.error}: " if self.error != type(self).__name__ else ""
        return (
            f"{named}{self.detail} (HTTP {self.status_code})" if self.status_code else f"{named}{self.detail}"
        )


class RequestRejected(APIError):
    """A 4xx answer: the request itself must change."""


class InputError(RequestRejected, learner.InputError):
    """Bad fields or request (422); the detail names the field."""


class PatchError(InputError, learner.PatchError):
    """The image cannot be decoded or cut: wrong shape or channels, too many pixels, gaze off the frame."""


class MalformedRequest(InputError):
    """The body is not valid JSON, or not a parseable multipart body (400)."""


class PayloadTooLarge(InputError):
    """A body, image or batch over a server limit (413); send a cut patch, or smaller batches."""


class UnsupportedMediaType(InputError):
    """The body is not ``application/json`` (or multipart where files are taken) (415)."""


class BodyTimeout(InputError):
    """The request's body did not arrive within the server's time (408)."""


class ConfigError(RequestRejected, learner.ConfigError):
    """A server setting makes the request impossible (422), e.g. a checkpoint with checkpoints disabled."""


class Unauthorized(RequestRejected):
    """No API key was sent, or the server does not know it (401): pass ``api_key=`` or set
    ``FOVEATE_API_KEY``."""


class Forbidden(RequestRejected):
    """The key is valid but lacks the route's scope (403), e.g. ``read`` for ``GET /v1/streams``."""


class UnknownStream(RequestRejected, LookupError):
    """No stream of that id lives on the worker (404): it has had no fixation yet, or was deleted."""


class Overloaded(RequestRejected):
    """Back-pressure (429): the request was refused before it was queued. The client retries these."""


class QueueFull(Overloaded):
    """Too many fixations are waiting for the worker."""


class TooManyStreams(Overloaded):
    """The worker (or the key's namespace) holds its maximum number of streams; delete idle ones."""


class RateLimited(Overloaded):
    """The key sent more requests a second than the server allows; retried after ``Retry-After``."""


class ServerError(APIError):
    """A 5xx answer: the server could not answer a request that may be fine."""


class WorkerUnavailable(ServerError):
    """No live worker, or the broker (Redis) is unreachable (503). The client retries these."""


class WorkerTimeout(ServerError):
    """The worker did not answer in time (504); the fixation may still be applied, so it is not retried."""


class WorkerError(ServerError):
    """The worker failed on input that passed validation (500): a server bug, logged there."""


class TrunkWeightsError(ServerError, learner.TrunkWeightsError):
    """The server's trunk weights are missing or unreadable (500)."""


class CheckpointError(ServerError, learner.CheckpointError):
    """The server cannot read or write a checkpoint (500)."""


class ArchitectureMismatch(CheckpointError, learner.ArchitectureMismatch):
    """The server's checkpoint was written by a model of another architecture (500)."""


def _by_name() -> dict[str, type[APIError]]:
    found: dict[str, type[APIError]] = {}
    pending: list[type[APIError]] = [APIError]
    while pending:
        klass = pending.pop()
        found[klass.__name__] = klass
        pending.extend(klass.__subclasses__())
    return found


_CLASSES = _by_name()


def error_from_body(body: Any, status_code: int = 0, response: httpx.Response | None = None) -> APIError:
    """The exception for an error body ``{"error": name, "detail": text}``.

    A known name gives its class; an unknown one :class:`RequestRejected` for a 4xx status,
    :class:`ServerError` otherwise (a batch item carries no status: it counts as 4xx, as the
    server only rejects batch items for their input).

    Examples
    --------
    >>> exc = error_from_body({"error": "UnknownStream", "detail": "no stream 'x'"}, 404)
    >>> type(exc).__name__, exc.status_code, isinstance(exc, LookupError)
    ('UnknownStream', 404, True)
    >>> type(error_from_body({"error": "Teapot", "detail": "short and stout"}, 418)).__name__
    'RequestRejected'
    """
    name = str(body.get("error", "")) if isinstance(body, dict) else ""
    detail = body.get("detail", "") if isinstance(body, dict) else ""
    if not isinstance(detail, str):
        detail = json.dumps(detail)
    klass = _CLASSES.get(name)
    if klass is None or klass is APIError:
        klass = ServerError if status_code >= 500 else RequestRejected
    return klass(
        detail or f"HTTP {status_code}", status_code=status_code, error=name or None, response=response
    )


def error_from_response(response: httpx.Response) -> APIError:
    """The exception for an error response (status >= 400)."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict) or "error" not in body:
        text = response.text[:200].strip().replace("\n", " ")
        generic = ServerError if response.status_code >= 500 else RequestRejected
        return generic(
            f"{response.request.method} {response.request.url.path} answered {response.status_code} "
            f"{response.reason_phrase} without a foveate error body: {text!r}",
            status_code=response.status_code,
            response=response,
        )
    return error_from_body(body, response.status_code, response)
