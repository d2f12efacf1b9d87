"""Operations: ``/healthz`` (the process answers), ``/readyz`` (a worker is alive and keeps up), ``/metrics``.

``/healthz`` is always open. ``/readyz`` and ``/metrics`` are open unless ``FOVEATE_PROTECT_OPS``
is set, when they need a key with ``read`` (Prometheus then sends it: ``authorization`` in its
scrape config). None of them ever shows a URL, a password or a key.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service import metrics
from service.api.deps import BrokerDep, authorize
from service.api.schemas import ErrorBody, Health, Ready
from service.backpressure import overdue
from service.errors import UNAVAILABLE_RETRY_S, retry_after_header

router = APIRouter(tags=["operations"])
_NOT_READY = "No live worker, or a backlog it cannot serve in time; see Retry-After"


def _protect(request: Request) -> None:
    if request.app.state.settings.protect_ops:
        authorize(request, "read")


@router.get("/healthz", response_model=Health, summary="Liveness: the API process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Ready,
    responses={503: {"model": ErrorBody, "description": _NOT_READY}},
    summary="Readiness: a worker is alive and keeps up",
)
async def readyz(request: Request, broker: BrokerDep) -> Response:
    """Ready when the worker lives (embedded: its thread runs; Redis: its heartbeat key is younger
    than ``FOVEATE_HEARTBEAT_TIMEOUT_S``) and the fixations waiting can be served within
    ``FOVEATE_SYNC_TIMEOUT_S`` at the worker's measured rate (service/backpressure.py). Either 503
    carries ``Retry-After``. Not counted as a rejected request."""
    _protect(request)
    settings = request.app.state.settings
    alive, why = await broker.worker_alive()
    worker = request.app.state.worker
    if worker is not None and not worker.alive:
        alive, why = False, "the worker thread has stopped; see the log"
    mode = "embedded" if settings.embedded else "redis"
    if not alive:
        return JSONResponse({"error": "WorkerUnavailable", "detail": why}, status_code=503,
                            headers=retry_after_header(UNAVAILABLE_RETRY_S))  # fmt: skip
    backlog, rate = await broker.worker_load()
    late = overdue(backlog, rate, settings.sync_timeout_s)
    if late is not None:
        assert rate is not None
        detail = (
            f"{backlog} fixations are waiting; at the worker's {rate:.1f} fixations/s they need "
            f"{backlog / rate:.1f} s, over FOVEATE_SYNC_TIMEOUT_S={settings.sync_timeout_s:g}"
        )
        return JSONResponse({"error": "Overloaded", "detail": detail}, status_code=503,
                            headers=retry_after_header(late))  # fmt: skip
    return JSONResponse(Ready(status="ready", mode=mode, detail=why).model_dump())


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus_metrics(request: Request) -> Response:
    """The API's metrics; with the worker in this process (embedded, ``serve --redis``) the worker's too."""
    _protect(request)
    which: Literal["api", "all"] = "all" if request.app.state.worker is not None else "api"
    return Response(metrics.render(which), media_type=CONTENT_TYPE_LATEST)
