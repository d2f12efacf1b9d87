"""Pure ASGI middleware (cheaper than ``BaseHTTPMiddleware`` on the hot path): browser rules, body
limits, HTTP metrics.

Order, outermost first: ``MetricsMiddleware`` (counts every answer), ``BrowserGuardMiddleware``
(cross-origin and content-type rules), ``BodyLimitMiddleware`` (size and time of the body).
"""

from __future__ import annotations

import json
import math
import time

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import (
    BodyTimeout,
    Forbidden,
    FoveateError,
    PayloadTooLarge,
    UnsupportedMediaType,
    error_headers,
    status_of,
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _too_large(limit: int, got: int | str) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"request body of {got} bytes is over the limit of {limit} bytes (FOVEATE_MAX_BODY_BYTES); "
        "send a cut patch instead of a frame, or fewer fixations per batch"
    )


async def send_error(send: Send, exc: FoveateError, *, close: bool = False) -> None:
    """Answer an error from middleware, with the body and headers of the app's error handler."""
    status, reason = status_of(type(exc))
    metrics.REJECTED_REQUESTS.labels(reason=reason).inc()
    body = json.dumps({"error": type(exc).__name__, "detail": str(exc)}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error_headers(exc).items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413 (by Content-Length up front, else while reading, a
    chunked body included) and bodies slower than ``timeout_s`` with 408.

    Past a limit the app's own answer is replaced: FastAPI turns any failure while it reads a body
    it validates into a 400, which would hide the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = math.inf) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await send_error(send, _too_large(self.max_bytes, int(value)), close=True)
                return
        seen = 0
        deadline = time.monotonic() + self.timeout_s
        body_done = False
        failure: FoveateError | None = None

        async def limited() -> Message:
            nonlocal seen, body_done, failure
            if body_done:  # after the body: the app waits for a disconnect, without a deadline
                return await receive()
            try:
                with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                failure = BodyTimeout(
                    f"the request body did not arrive within {self.timeout_s:g} s (FOVEATE_BODY_TIMEOUT_S); "
                    "send it at once, or a smaller one"
                )
                raise failure from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.max_bytes:
                    failure = _too_large(self.max_bytes, f"more than {self.max_bytes}")
                    raise failure
            return message

        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if failure is not None:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await send_error(send, failure, close=True)
                return  # the app's own answer to the failure is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited, guarded_send)


_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _loopback_host(host: str) -> bool:
    from service.auth import is_loopback

    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return is_loopback(name)


class BrowserGuardMiddleware:
    """No state change from another web origin, and no body a browser may send without asking.

    - A POST, PUT, PATCH or DELETE whose ``Origin`` (or ``Sec-Fetch-Site: cross-site``) names a site
      other than the server itself and not in ``allowed_origins`` is refused with 403. Browsers send
      ``Origin`` on such requests; rigs, curl and the SDK send none.
    - A body must be ``application/json``, or ``multipart/form-data`` on the routes in
      ``multipart_paths`` (415 otherwise): ``text/plain`` and form encodings are what a web page can
      send cross-origin without a preflight, and a body is required, so a bodiless POST is a 415 too.
    """

    def __init__(
        self,
        app: ASGIApp,
        allowed_origins: list[str],
        multipart_suffixes: tuple[str, ...],
        *,
        keys_required: bool,
    ) -> None:
        self.app = app
        self.allowed = {o.lower() for o in allowed_origins}
        self.multipart_suffixes = multipart_suffixes
        # Without keys, a page's own origin counts only on a loopback name: a name that an attacker's
        # DNS points at 127.0.0.1 (DNS rebinding) would otherwise make their page "same-origin".
        self.keys_required = keys_required

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _STATE_CHANGING:
            await self.app(scope, receive, send)
            return
        headers = {name: value for name, value in scope["headers"]}
        problem = self._problem(scope, headers)
        if problem is not None:
            await send_error(send, problem)
            return
        await self.app(scope, receive, send)

    def _problem(self, scope: Scope, headers: dict[bytes, bytes]) -> FoveateError | None:
        origin = headers.get(b"origin", b"").decode("latin-1").strip().rstrip("/").lower()
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        own = {f"http://{host}", f"https://{host}"} if self.keys_required or _loopback_host(host) else set()
        if origin and origin not in own and origin not in self.allowed:
            return Forbidden(
                f"a browser page from {origin[:100]} may not change state here; add the origin to "
                "FOVEATE_CORS_ORIGINS to allow it"
            )
        if not origin and headers.get(b"sec-fetch-site", b"") == b"cross-site":
            return Forbidden("a cross-site browser request may not change state here")
        if scope["method"] == "DELETE":
            return None  # browsers never send a DELETE cross-origin without asking first
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype == b"application/json":
            return None
        if ctype == b"multipart/form-data" and scope["path"].endswith(self.multipart_suffixes):
            return None
        multipart = " (or multipart/form-data with a file part)" if scope["path"].endswith(
            self.multipart_suffixes) else ""  # fmt: skip
        got = ctype.decode("latin-1")[:60] or "no Content-Type"
        return UnsupportedMediaType(
            f"send the body as JSON with 'Content-Type: application/json'{multipart}, got {got}; "
            "a POST without data takes the body {}"
        )


def _route_label(scope: Scope) -> str:
    """The matched route's full template, e.g. ``/v1/streams/{stream_id}``; ``unmatched`` otherwise.

    FastAPI keeps an included router's prefix out of ``route.path``; the prefixes here are literal,
    so they are the leading segments of the request path that the template does not cover.
    """
    template = getattr(scope.get("route"), "path", None)
    if not template:
        return "unmatched"
    segments = scope["path"].rstrip("/").split("/")
    depth = len(template.rstrip("/").split("/"))
    return "/".join(segments[: max(0, len(segments) - depth + 1)]) + str(template)


class MetricsMiddleware:
    """Count requests and time them by route template (bounded labels, never raw paths)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = _route_label(scope)
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            metrics.HTTP_REQUESTS.labels(route=route, method=method, status=str(status)).inc()
            metrics.HTTP_SECONDS.labels(route=route).observe(time.perf_counter() - start)
