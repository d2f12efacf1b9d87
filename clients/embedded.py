"""``EmbeddedServer``: a foveate server (API and worker) on a free loopback port, in a thread.

Used by ``foveate replay --embedded`` and ``foveate demo``: one command, no server to start first.
It is the real thing, served by uvicorn on 127.0.0.1 and reached over HTTP like any other server,
so replay measures what a rig would see. The service is imported only when a server starts; the
rest of ``clients`` does not need it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from types import TracebackType
from typing import Any

from clients.sdk import FoveateClient
from clients.sdk.errors import ClientError

__all__ = ["EmbeddedServer"]

logger = logging.getLogger(__name__)

_LOOPBACK = "127.0.0.1"


class EmbeddedServer:
    """The embedded service (API + worker, no Redis) served by uvicorn in a background thread.

    Parameters
    ----------
    startup_timeout : float
        Seconds to wait for ``/readyz`` (building the model takes a few seconds on a CPU).
    **settings
        Overrides of :class:`service.config.Settings` (``n_units=64``, ...); everything else comes
        from the ``FOVEATE_*`` environment. Checkpoints are off unless ``checkpoint_path`` is given,
        so every run starts from a fresh model and leaves no files behind.

    Examples
    --------
    >>> with EmbeddedServer(n_units=64, embed_dim=16) as server:   # doctest: +SKIP
    ...     client = FoveateClient(server.url)
    """

    def __init__(self, *, startup_timeout: float = 120.0, **settings: Any) -> None:
        self.startup_timeout = startup_timeout
        self.overrides: dict[str, Any] = {"checkpoint_path": None, **settings}
        self.url = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> EmbeddedServer:
        """Build the app, start uvicorn on a free port of 127.0.0.1, and wait until it is ready."""
        import uvicorn

        from service.api.main import create_app
        from service.api.server import uvicorn_config
        from service.config import Settings

        # Embedded means no Redis, whatever FOVEATE_REDIS_URL says, and no keys: it listens on loopback only.
        settings = Settings(
            **{**self.overrides, "redis_url": None, "host": _LOOPBACK, "api_keys": None, "keys_file": None}
        )
        app = create_app(settings)
        # Binding the socket here (port 0) gives a free port with no race against other processes.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((_LOOPBACK, 0))
        port = int(sock.getsockname()[1])
        self.url = f"http://{_LOOPBACK}:{port}"
        # the service's own server limits (header deadline, keep-alive, connections), on this socket
        config = uvicorn_config(app, settings, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, args=(sock,), name="foveate-embedded", daemon=True)
        self._thread.start()
        logger.info("embedded server starting at %s", self.url)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, sock: socket.socket) -> None:
        try:
            self._server.run(sockets=[sock])
        except BaseException as exc:  # reported to the starting thread by _wait_ready
            self._error = exc
        finally:
            sock.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with FoveateClient(self.url, timeout=5.0) as client:
            while True:
                if self._thread is not None and not self._thread.is_alive():
                    raise RuntimeError(f"the embedded server stopped during start-up: {self._error!r}")
                try:
                    client.wait_ready(timeout=0.5, interval=0.05)
                    return
                except ClientError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def stop(self) -> None:
        """Ask uvicorn to shut down (the worker stops with the app) and wait for the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30.0)
            if self._thread.is_alive():
                logger.warning("the embedded server did not stop within 30 s")
        self._thread = None

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
