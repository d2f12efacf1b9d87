"""The FastAPI application: ``create_app`` wires settings, broker, worker, routes and error handlers.

``foveate serve`` / ``foveate api`` (service/cli.py) build it and refuse to bind beyond loopback
without API keys; ``uvicorn service.api.main:create_app --factory`` reads the same ``FOVEATE_*``
settings but makes no such check, so use it only behind keys or on 127.0.0.1. Without
``FOVEATE_REDIS_URL`` it runs the worker in this process (embedded mode), with it the API alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
from fastapi import APIRouter, FastAPI

from service.api.errors import install_error_handlers
from service.api.middleware import BodyLimitMiddleware, BrowserGuardMiddleware, MetricsMiddleware
from service.api.quotas import RateLimiter, StreamQuota
from service.api.routes import fixations, health, model, streams, ui
from service.auth import KeyStore
from service.broker import Broker
from service.brokers import make_broker
from service.config import Settings

if TYPE_CHECKING:  # the API alone (Redis mode) needs no torch: the worker is imported only to embed it
    from service.worker import Worker

API_VERSION = "v1"


def create_app(
    settings: Settings | None = None, broker: Broker | None = None, worker: Worker | None = None
) -> FastAPI:
    """Build the app.

    Parameters
    ----------
    settings
        ``None`` reads ``FOVEATE_*`` from the environment.
    broker
        ``None`` makes one from the settings: Redis when ``redis_url`` is set, in-process otherwise.
    worker
        A worker to start and stop with the app. ``None`` creates one in embedded mode (no Redis) and
        none in Redis mode, where ``foveate worker`` runs it in its own process.

    Examples
    --------
    >>> app = create_app(Settings(redis_url="redis://127.0.0.1:6379/0"))
    >>> sorted(p for p in app.openapi()["paths"] if p.startswith("/v1/model"))
    ['/v1/model', '/v1/model/checkpoint']
    """
    settings = settings if settings is not None else Settings()
    broker = broker if broker is not None else make_broker(settings)
    if worker is None and settings.embedded:
        from service.worker import Worker

        worker = Worker(settings, broker)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await broker.start_api()
        if worker is not None and not worker.started:
            await anyio.to_thread.run_sync(worker.start)
        try:
            yield
        finally:
            if worker is not None:
                await anyio.to_thread.run_sync(worker.stop)  # writes the final checkpoint
            await broker.close_api()

    app = FastAPI(
        title="foveate",
        version="0.1.0",
        summary="Online learning from eye-tracking fixations: a recurrent JEPA trained by RFP.",
        lifespan=lifespan,
        docs_url=None,  # served from the package by routes/ui.py: FastAPI's loads from a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.broker = broker
    app.state.worker = worker
    app.state.keys = KeyStore.from_settings(settings.api_keys, settings.keys_file)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
    app.state.stream_quota = StreamQuota(settings.max_streams_per_key)
    # Decoding a frame takes up to max_pixels * 3 bytes a few times over: at most this many at once.
    app.state.decode_limiter = anyio.CapacityLimiter(settings.decode_threads)
    install_error_handlers(app)
    # Added innermost first: metrics see every answer, the browser rules come before any body is read.
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    app.add_middleware(
        BrowserGuardMiddleware,
        allowed_origins=settings.cors_origin_list,
        multipart_suffixes=("/fixations",),
        keys_required=app.state.keys is not None,
    )
    if settings.cors_origin_list:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            max_age=600,
        )
    app.add_middleware(MetricsMiddleware)
    v1 = APIRouter(prefix=f"/{API_VERSION}")
    for module in (fixations, streams, model):
        v1.include_router(module.router)
    app.include_router(v1)
    app.include_router(health.router)
    ui.install(app)  # the live page (/, /ui, /ui/events) and the offline /docs
    return app
