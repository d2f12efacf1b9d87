"""The live page for the lab: ``GET /`` and ``/ui``, its event stream, and ``/docs`` served offline.

- ``GET /``, ``GET /ui``: the page (service/ui/static/index.html; plain HTML, CSS and JavaScript,
  its charts drawn as SVG by ui.js; nothing is fetched from the internet).
- ``GET /ui/events``: Server-Sent Events, one ``snapshot`` event every ``interval`` seconds (0.5 by
  default, 0.25 at least): the model, the streams, the error by step against the repeat baseline, the
  effective dimensionality, ticks per second and the queue depth. Each snapshot reads what the worker
  keeps anyway (its stream records, the metrics' gauges); the worker does no work for it. A stream
  ends after :data:`STREAM_SECONDS` and the page reconnects at once, so that an open page never holds
  up a graceful shutdown for long.
- ``GET /ui/streams/{id}``: one stream's recent errors and patch thumbnails (service/live.py).
- ``GET /docs``: Swagger UI from the vendored swagger-ui-dist (service/ui/static/vendor/swagger-ui).

With the worker in this process (``foveate serve``) everything is read in place; with the API alone
(Redis mode) the streams and the model come from the worker by command, and the per-stream series,
thumbnails and the worker's metrics are not available here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from service import live, metrics
from service.api.deps import BrokerDep, Principal, ReadKey, StreamId, ask_worker
from service.errors import UnknownStream

router = APIRouter(include_in_schema=False)

STATIC_DIR = resources.files("service.ui") / "static"
STATIC_URL = "/ui/static"
SWAGGER_DIR = f"{STATIC_URL}/vendor/swagger-ui"
#: Seconds one event stream lasts before the page reconnects (see the module docstring).
STREAM_SECONDS = 15.0
#: streams a snapshot lists, the most recently fed first (the model card counts them all): at the
#: default cap of 10,000 streams a full list would be megabytes of JSON per open page per second
MAX_ROWS = 200


def install(app: FastAPI) -> None:
    """Add the page, its events, its static files and the offline ``/docs`` to ``app``.

    The app must be created with ``docs_url=None`` (FastAPI's own /docs loads from a CDN).
    """
    app.state.ui_started = time.time()
    app.include_router(router)
    app.mount(STATIC_URL, StaticFiles(directory=str(STATIC_DIR)), name="ui-static")


@router.get("/", response_class=HTMLResponse)
@router.get("/ui", response_class=HTMLResponse)
async def page() -> HTMLResponse:
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


@router.get("/docs", response_class=HTMLResponse)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - API",
        swagger_js_url=f"{root}{SWAGGER_DIR}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{SWAGGER_DIR}/swagger-ui.css",
        swagger_favicon_url=f"{root}{SWAGGER_DIR}/favicon-32x32.png",
        oauth2_redirect_url=None,
    )


@router.get("/ui/streams/{stream_id}")
async def stream_detail(stream_id: StreamId, key: ReadKey) -> dict[str, Any]:
    """Recent errors and thumbnails of one of the key's streams (404 when this process's feed has
    none, or it is another namespace's)."""
    qualified = key.qualify(stream_id)
    detail = await anyio.to_thread.run_sync(live.FEED.detail, qualified)  # PNG encoding off the loop
    if detail is None:
        raise UnknownStream(f"no recent fixations of stream {stream_id[:140]!r} in this process")
    if "stream_id" in detail:
        detail["stream_id"] = key.local(detail["stream_id"])
    return detail


@router.get("/ui/events")
async def events(
    request: Request,
    broker: BrokerDep,
    key: ReadKey,
    interval: float = Query(0.5, ge=0.25, le=10.0, description="Seconds between snapshots"),
) -> StreamingResponse:
    """Snapshots of the model and of the key's streams (its namespace only, admin keys too: the
    page's buttons act through the namespaced /v1 routes) as Server-Sent Events."""
    source = _Snapshots(request, broker, key)

    async def stream() -> AsyncIterator[str]:
        yield "retry: 1000\n\n"
        end = time.monotonic() + STREAM_SECONDS
        while time.monotonic() < end:
            snap = await source.next()
            yield f"event: snapshot\ndata: {json.dumps(snap, allow_nan=False)}\n\n"
            await anyio.sleep(interval)
        yield "event: bye\ndata: {}\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _gauge(gauge: Any) -> float | None:
    for family in gauge.collect():
        for sample in family.samples:
            return _finite(sample.value)
    return None


def _measured(dim: float | None) -> float | None:
    """The participation ratio is at least 1 once measured; the gauge reads 0 before that."""
    return dim if dim is not None and dim > 0 else None


def _by_label(metric: Any, suffix: str = "") -> dict[str, float]:
    """``{step label: value}`` of a labelled metric's samples named ``<name><suffix>``."""
    out: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == family.name + suffix:
                out[sample.labels["step"]] = sample.value
    return out


def _by_step() -> list[dict[str, Any]]:
    """Per step label: the model's running mean error, the repeat baseline's mean, the skill."""
    errors = _by_label(metrics.ERROR_BY_STEP)
    rsum = _by_label(metrics.STEP_REPEAT_ERROR, "_sum")
    rcount = _by_label(metrics.STEP_REPEAT_ERROR, "_count")
    skill = _by_label(metrics.PREDICTION_SKILL)
    labels = sorted(errors, key=lambda s: int(s.rstrip("+")) + (0.5 if s.endswith("+") else 0))
    return [
        {"step": s, "error": _finite(errors[s]),
         "repeat_error": _finite(rsum[s] / rcount[s]) if rcount.get(s) else None,
         "skill": _finite(skill.get(s))}
        for s in labels
    ]  # fmt: skip


def _record_row(rec: Any) -> dict[str, Any]:
    return {
        "stream_id": rec.stream_id,
        "step": rec.step,
        "fixations": rec.fixations,
        "updated_at": rec.updated_at,
        "last_seq": rec.last_seq,
        "running_error": _finite(rec.running_error),
        "last_error": _finite(rec.last_error),
        "repeat_error": _finite(rec.mean_repeat_error),
        "skill": _finite(rec.skill),
    }


class _Snapshots:
    """One event stream's snapshots; remembers the last tick count to give ticks per second."""

    def __init__(self, request: Request, broker: Any, key: Principal) -> None:
        self.app = request.app
        self.broker = broker
        self.key = key
        self.worker = request.app.state.worker
        self._static: dict[str, Any] | None = None
        self._last: tuple[float, int, int] | None = None  # (monotonic time, ticks, fixations)

    async def next(self) -> dict[str, Any]:
        settings = self.app.state.settings
        if self.worker is not None:
            model, rows = self._local()
        else:
            model = (await ask_worker(self.broker, "model"))["model"]
            rows = (await ask_worker(self.broker, "streams", prefix=self.key.prefix))["streams"]
        prefix = self.key.prefix
        rows = [
            {**r, "stream_id": self.key.local(r["stream_id"])}
            for r in rows
            if str(r.get("stream_id", "")).startswith(prefix)
        ]
        model["streams"] = len(rows)  # the key's
        model["uptime_s"] = time.time() - self.app.state.ui_started
        model["trunk"] = settings.trunk
        model["trunk_weights"] = settings.trunk_weights
        now = time.monotonic()
        ticks, fixations = int(model.get("ticks") or 0), sum(int(r.get("fixations") or 0) for r in rows)
        rates: dict[str, float | None] = {"ticks_per_s": None, "fixations_per_s": None}
        if self._last is not None and now > self._last[0]:
            dt = now - self._last[0]
            rates = {"ticks_per_s": max(0.0, (ticks - self._last[1]) / dt),
                     "fixations_per_s": max(0.0, (fixations - self._last[2]) / dt)}  # fmt: skip
        self._last = (now, ticks, fixations)
        rows.sort(key=lambda r: -(r.get("updated_at") or 0.0))
        rows = rows[:MAX_ROWS]
        return {
            "t": time.time(),
            "mode": "embedded" if settings.embedded else "redis",
            "model": model,
            "rates": rates,
            "queue_depth": _gauge(metrics.QUEUE_DEPTH) if self.worker is not None else None,
            "effective_dim": _measured(_gauge(metrics.EFFECTIVE_DIM)) if self.worker is not None else None,
            "by_step": _by_step() if self.worker is not None else [],
            "skill_all": _finite(_by_label(metrics.PREDICTION_SKILL).get(metrics.ALL_STEPS))
            if self.worker is not None
            else None,
            "streams": rows,
        }

    def _local(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Read the in-process worker without asking it: list() of a dict is atomic under the GIL,
        and a record's fields are plain numbers (a snapshot may mix two ticks, harmless here)."""
        worker = self.worker
        learner = worker.learner
        if self._static is None:
            info = worker.model_info()
            self._static = {k: info[k] for k in ("learner", "device", "config", "parameters",
                                                 "trainable_parameters", "bytes_per_stream")}  # fmt: skip
        records = list(worker.records.values())
        model = {
            **self._static,
            "updates_applied": learner.updates_applied,
            "ticks": learner.ticks,
            "streams": len(records),
            "last_checkpoint": worker.last_checkpoint,
        }
        return model, [_record_row(r) for r in records]
