"""Operations: ``/healthz`` (the process answers), ``/readyz`` (a worker is alive), ``/metrics``.

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

router = APIRouter(tags=["operations"])


def _protect(request: Request) -> None:
    if request.app.state.settings.protect_ops:
        authorize(request, "read")


@router.get("/healthz", response_model=Health, summary="Liveness: the API process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Ready,
    responses={503: {"model": ErrorBody, "description": "No live worker"}},
    summary="Readiness: a worker is alive",
)
async def readyz(request: Request, broker: BrokerDep) -> Response:
    """Embedded: the worker thread runs. Redis: the worker's heartbeat key is younger than
    ``FOVEATE_HEARTBEAT_TIMEOUT_S``. Not counted as a rejected request when not ready."""
    _protect(request)
    alive, why = await broker.worker_alive()
    worker = request.app.state.worker
    if worker is not None and not worker.alive:
        alive, why = False, "the worker thread has stopped; see the log"
    mode = "embedded" if request.app.state.settings.embedded else "redis"
    if not alive:
        return JSONResponse({"error": "WorkerUnavailable", "detail": why}, status_code=503)
    return JSONResponse(Ready(status="ready", mode=mode, detail=why).model_dump())


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus_metrics(request: Request) -> Response:
    """The API's metrics; with the worker in this process (embedded, ``serve --redis``) the worker's too."""
    _protect(request)
    which: Literal["api", "all"] = "all" if request.app.state.worker is not None else "api"
    return Response(metrics.render(which), media_type=CONTENT_TYPE_LATEST)
