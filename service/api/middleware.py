"""Pure ASGI middleware (cheaper than ``BaseHTTPMiddleware`` on the hot path): body limit, HTTP metrics."""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import PayloadTooLarge

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _too_large(limit: int, got: int | str) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"request body of {got} bytes is over the limit of {limit} bytes (FOVEATE_MAX_BODY_BYTES); "
        "send a cut patch instead of a frame, or fewer fixations per batch"
    )


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413: by Content-Length up front, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                exc = _too_large(self.max_bytes, int(value))
                metrics.REJECTED_REQUESTS.labels(reason="too_large").inc()
                body = json.dumps({"error": "PayloadTooLarge", "detail": str(exc)}).encode()
                await send({"type": "http.response.start", "status": 413,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"connection", b"close")]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Raised inside the endpoint's body read, so the error handler answers 413.
                    raise _too_large(self.max_bytes, f"more than {self.max_bytes}")
            return message

        await self.app(scope, limited, send)


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
