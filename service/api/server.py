"""The HTTP server: uvicorn with limits on how slowly and how much a client may send.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but puts no deadline on a request's
headers: a client that sends one header byte every few seconds holds a connection (and a file
descriptor) for as long as it likes, and thousands of them exhaust the server. The protocol classes
here add two limits to uvicorn's own (httptools, or h11 without it):

- the headers of each request must be complete within ``header_timeout_s`` of the connection opening
  (or of the previous response), else the server answers 408 and closes the connection;
- the headers may take at most ``max_header_bytes``, else 431 and close.

The body's limits (size 413, time 408) are the app's (service/api/middleware.py). Beyond
``max_connections`` connections or tasks (uvicorn's ``limit_concurrency``) the server answers 503
with the API's error body and ``Retry-After``, where uvicorn's own answer has neither.

Examples
--------
>>> from service.config import Settings
>>> config = uvicorn_config(object(), Settings(header_timeout_s=5))
>>> config.http.header_timeout_s
5.0
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.config import Settings

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover  (uvicorn[standard] brings httptools)
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

_HEAD = b"content-type: text/plain\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
_408 = b"HTTP/1.1 408 Request Timeout\r\n" + _HEAD
_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\n" + _HEAD
OVER_CAPACITY_RETRY_S = 1  # connections come and go within a second or so


async def over_capacity(scope: Any, receive: Any, send: Any) -> None:
    """The answer beyond ``max_connections``: 503 with ``Retry-After``, in the API's error shape."""
    body = json.dumps({
        "error": "ServiceUnavailable",
        "detail": "the server holds FOVEATE_MAX_CONNECTIONS connections or requests; retry after Retry-After",
    }).encode()  # fmt: skip
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", str(OVER_CAPACITY_RETRY_S).encode()), (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Guard:
    """Mixed into a uvicorn protocol: a deadline and a size limit for each request's headers."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    app: Any
    limit_concurrency: int | None
    connections: set[Any]
    tasks: set[Any]

    def _dispatch(self, handle: Callable[[], None]) -> None:
        """Run uvicorn's dispatch of a request; over ``limit_concurrency`` with :func:`over_capacity` as
        the app (and uvicorn's own check, which would answer a bare 503, off for that call)."""
        limit = self.limit_concurrency
        if limit is None or (len(self.connections) < limit and len(self.tasks) < limit):
            handle()
            return
        app, self.app, self.limit_concurrency = self.app, over_capacity, None
        try:
            handle()
        finally:
            self.app, self.limit_concurrency = app, limit

    def _arm(self) -> None:
        self._disarm()
        self._header_bytes = 0
        self._tail = b""
        self._waiting_headers = True
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout_s, self._headers_too_slow
        )

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        self._header_timer = None
        self._waiting_headers = False

    def _refuse(self, head: bytes, text: str) -> None:
        self._disarm()
        if not self.transport.is_closing():
            body = text.encode()
            self.transport.write(head % len(body) + body)
            self.transport.close()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._waiting_headers:
            self._refuse(_408, f"request headers not complete within {self.header_timeout_s:g} s\n")

    def _count(self, data: bytes) -> bool:
        """Count the bytes up to the end of the headers; False (and 431) when over the limit."""
        if not getattr(self, "_waiting_headers", False):
            return True
        tail = getattr(self, "_tail", b"")
        end = (tail + data).find(b"\r\n\r\n")
        self._header_bytes += len(data) if end < 0 else max(0, end + 4 - len(tail))
        self._tail = (tail + data)[-3:]
        if self._header_bytes > self.max_header_bytes:
            self._refuse(_431, f"request headers over {self.max_header_bytes} bytes\n")
            return False
        return True


if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
        """uvicorn's httptools protocol with the header deadline and size limit."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._count(data):
                super().data_received(data)

        def on_headers_complete(self) -> None:
            self._disarm()
            self._dispatch(super().on_headers_complete)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this keep-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)


class GuardedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 protocol with the header deadline (h11 limits the headers' size itself:
    ``h11_max_incomplete_event_size``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        import h11

        # h11 reports the whole request head as one event: once it is out, the headers are in.
        if self._waiting_headers and self.conn.their_state in (h11.SEND_BODY, h11.DONE):
            self._disarm()
        self._dispatch(super().handle_events)
        if self._waiting_headers and self.conn.their_state in (h11.SEND_BODY, h11.DONE):
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_class(settings: Settings, *, h11_only: bool = False) -> type[asyncio.Protocol]:
    """The guarded protocol (httptools when installed), with the settings' limits."""
    base: Any = GuardedH11Protocol if h11_only or HttpToolsProtocol is None else GuardedHttpToolsProtocol
    limits = {
        "header_timeout_s": float(settings.header_timeout_s),
        "max_header_bytes": settings.max_header_bytes,
    }
    return type(base.__name__, (base,), limits)


def uvicorn_config(app: Any, settings: Settings, *, h11_only: bool = False, **options: Any) -> uvicorn.Config:
    """A ``uvicorn.Config`` for the app with the settings' host, port and every limit.

    ``options`` override or add uvicorn options (``log_level``, ``lifespan``, ...).
    """
    values: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": protocol_class(settings, h11_only=h11_only),
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_connections,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "log_level": settings.log_level.lower(),
        "access_log": False,
        "server_header": False,
        **options,
    }
    return uvicorn.Config(app, **values)
