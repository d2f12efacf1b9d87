"""The lean path of ``POST /v1/streams/{id}/fixations`` (service.api.lean) answers as FastAPI did.

Real uvicorn servers on 127.0.0.1: the ``embedded`` service, and a tiny app that serves one route
both ways so that the bytes of the two answers can be compared.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from service.api.lean import NOT_LEAN, LeanRoute, lean_route
from service.api.routes.fixations import plain_flags
from service.api.schemas import FixationResult
from tests.service._support import ThreadedServer

FIXATIONS = "/v1/streams/{stream_id}/fixations"


def raw_body(seed: int, seq: int | None = None) -> dict[str, Any]:
    patch = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    body: dict[str, Any] = {"raw_b64": base64.b64encode(patch.tobytes()).decode(), "shape": [32, 32, 3]}
    if seq is not None:
        body["seq"] = seq
    return body


@pytest.fixture
def client(embedded: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=embedded.url, timeout=60.0) as c:
        yield c


@pytest.mark.parametrize(
    ("query", "flags"),
    [
        (b"", (True, False)),
        (b"wait=false", (False, False)),
        (b"return_prediction=1&wait=0", (False, True)),
        (b"wait=true&return_prediction=true&other=x", (True, True)),
        (b"&&unrelated", (True, False)),
        (b"wait=yes", None),  # pydantic reads it; the lean path does not guess
        (b"wait", None),
        (b"wait=true&wait=false", None),  # repeated: FastAPI picks one
        (b"wai%74=false", None),  # percent-encoded names or values
        (b"return_prediction=+1", None),
    ],
)
def test_plain_flags_takes_only_unambiguous_queries(query: bytes, flags: tuple[bool, bool] | None) -> None:
    assert plain_flags(query) == flags


def test_the_route_keeps_its_openapi_operation(embedded: ThreadedServer) -> None:
    app = embedded.app
    from service.api.routes import fixations

    route = next(
        r for r in fixations.router.routes if getattr(r, "path", "") == "/streams/{stream_id}/fixations"
    )
    assert isinstance(route, LeanRoute)
    op = app.openapi()["paths"][FIXATIONS]["post"]
    assert op["operationId"] == "post_fixation_v1_streams__stream_id__fixations_post"
    assert set(op["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert {p["name"] for p in op["parameters"]} == {"stream_id", "wait", "return_prediction"}
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/FixationResult")
    assert op["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith("/Accepted")


def test_lean_and_full_paths_answer_alike(client: httpx.Client) -> None:
    # "1" is served by the lean path, "on" (valid for pydantic) by FastAPI's handler
    lean = client.post("/v1/streams/lean-a/fixations?return_prediction=1", json=raw_body(1, seq=0))
    full = client.post("/v1/streams/full-a/fixations?return_prediction=on", json=raw_body(1, seq=0))
    assert lean.status_code == full.status_code == 200, (lean.text, full.text)
    assert lean.headers["content-type"] == full.headers["content-type"] == "application/json"
    a, b = lean.json(), full.json()
    assert list(a) == list(b) == [
        "stream_id", "seq", "status", "gap", "step", "error", "repeat_error", "skill", "skipped",
        "running_error", "updates_applied", "request_id", "prediction"
    ]  # fmt: skip
    assert (a["stream_id"], a["seq"], a["step"], a["error"]) == ("lean-a", 0, 1, None)
    assert (b["stream_id"], b["seq"], b["step"], b["error"]) == ("full-a", 0, 1, None)
    assert len(a["prediction"]) == len(b["prediction"]) == 16
    # without return_prediction and seq: no prediction key, seq null, on both paths
    lean = client.post("/v1/streams/lean-a/fixations", json=raw_body(2)).json()
    full = client.post("/v1/streams/full-a/fixations?unused=%20", json=raw_body(2)).json()
    assert list(lean) == list(full) and "prediction" not in lean and lean["seq"] is None
    assert lean["step"] == full["step"] == 2 and isinstance(lean["error"], float)


def test_wait_false_is_202_on_both_paths(client: httpx.Client) -> None:
    lean = client.post("/v1/streams/lean-q/fixations?wait=false", json=raw_body(3, seq=5))
    full = client.post("/v1/streams/full-q/fixations?wait=no", json=raw_body(3, seq=5))
    assert lean.status_code == full.status_code == 202
    assert {k: v for k, v in lean.json().items() if k != "request_id"} == {
        "stream_id": "lean-q", "seq": 5, "status": "queued"
    }  # fmt: skip
    assert list(lean.json()) == list(full.json())


@pytest.mark.parametrize(
    ("path", "detail"),
    [
        ("/v1/streams/lean-e/fixations?wait=maybe", "query.wait"),
        ("/v1/streams/lean-e/fixations?return_prediction=2", "query.return_prediction"),
        ("/v1/streams/bad%20id/fixations", "path.stream_id"),
        ("/v1/streams/" + "x" * 129 + "/fixations", "path.stream_id"),
    ],
)
def test_odd_parameters_get_fastapis_errors(client: httpx.Client, path: str, detail: str) -> None:
    r = client.post(path, json=raw_body(4))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "InputError" and detail in r.json()["detail"]


def test_lean_body_errors_are_the_same_errors(client: httpx.Client) -> None:
    broken = client.post(
        "/v1/streams/lean-b/fixations", content=b"{", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and broken.json()["error"] == "MalformedRequest"
    extra = client.post("/v1/streams/lean-b/fixations", json={**raw_body(5), "colour": "red"})
    assert extra.status_code == 422 and "colour" in extra.json()["detail"]
    shape = client.post("/v1/streams/lean-b/fixations", json={**raw_body(5), "shape": [8, 8, 3]})
    assert shape.status_code == 422 and shape.json()["error"] in ("InputError", "PatchError")


def test_lean_requests_are_counted_under_the_route_template(client: httpx.Client) -> None:
    def count() -> float:
        text = client.get("/metrics").text
        key = f'foveate_http_requests_total{{method="POST",route="{FIXATIONS}",status="200"}}'
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(key))

    before = count()
    assert client.post("/v1/streams/lean-m/fixations", json=raw_body(6)).status_code == 200
    assert count() == before + 1


# ------------------------------------------------------------ LeanRoute on a tiny app


class Point(BaseModel):
    name: str
    x: float | None = None
    y: float = 0.0
    tags: list[float] | None = None


def point(n: int) -> Any:
    if n == 0:
        return {"name": "zero"}  # a plain dict is validated against the response model too
    return Point(name=f"p{n}", x=1e-05 * n, tags=[0.1 + 0.2, 1e300, -0.0])


async def lean_point(request: Request) -> Any:
    n = request.scope["path_params"]["n"]
    if request.query_params.get("full") or not n.isdigit():
        return NOT_LEAN
    return point(int(n))


async def get_point(n: int, full: bool = False) -> Any:
    return point(n)


#: Worker replies as the fixation route's model serialises them: scored (skill below 0, skipped),
#: unscored (nulls), and a reply of a worker from before repeat errors (the fields left out).
RESULTS: list[dict[str, Any]] = [
    {"stream_id": "s", "seq": 3, "step": 4, "error": 0.30000001192092896, "repeat_error": 0.1 + 0.2,
     "skill": 1 - 0.30000001192092896 / (0.1 + 0.2), "skipped": True, "running_error": 1e-7,
     "updates_applied": 12, "request_id": "r"},
    {"stream_id": "s", "seq": None, "step": 1, "error": None, "repeat_error": None, "skill": None,
     "skipped": False, "running_error": None, "updates_applied": 0, "request_id": "r"},
    {"stream_id": "s", "step": 2, "error": 0.5, "running_error": 0.5, "updates_applied": 1},
]  # fmt: skip


async def lean_result(request: Request) -> Any:
    n = request.scope["path_params"]["n"]
    if request.query_params.get("full") or not n.isdigit():
        return NOT_LEAN
    return FixationResult(**RESULTS[int(n)])


async def get_result(n: int, full: bool = False) -> Any:
    return FixationResult(**RESULTS[n])


async def lean_marked(request: Request) -> Any:
    """A lean coroutine whose answers say they are its own."""
    return Response(b'{"name": "lean"}', media_type="application/json", headers={"x-answered-by": "lean"})


class OldField:
    """A response field as FastAPI had it before 0.130: ``validate`` and ``serialize``, no
    ``serialize_json`` (the serialisation lean.py copies)."""

    def __init__(self, field: Any) -> None:
        self._field = field

    def __getattr__(self, name: str) -> Any:
        if name == "serialize_json":
            raise AttributeError(name)
        return getattr(self._field, name)


class OldFastAPIRoute(lean_route(lean_marked)):  # type: ignore[misc,valid-type]
    """The lean route as it is built under an older FastAPI (its response field lacks serialize_json)."""

    def get_route_handler(self) -> Any:
        if self.response_field is not None and not isinstance(self.response_field, OldField):
            self.response_field = OldField(self.response_field)
        return super().get_route_handler()


@pytest.fixture(scope="module")
def tiny() -> Iterator[str]:
    router = APIRouter()
    for path, route_class in (("/marked/{n}", lean_route(lean_marked)), ("/old/{n}", OldFastAPIRoute)):
        router.add_api_route(  # JSONResponse: FastAPI's own handler then serialises with .serialize
            path, get_point, methods=["GET"], response_model=Point, response_class=JSONResponse,
            route_class_override=route_class,
        )  # fmt: skip
    router.add_api_route(
        "/points/{n}",
        get_point,
        methods=["GET"],
        response_model=Point,
        response_model_exclude_unset=True,
        route_class_override=lean_route(lean_point),
    )
    router.add_api_route(  # as service.api.routes.fixations declares it
        "/results/{n}",
        get_result,
        methods=["GET"],
        response_model=FixationResult,
        response_model_exclude_unset=True,
        route_class_override=lean_route(lean_result),
    )
    app = FastAPI()
    app.include_router(router, prefix="/v1")
    server = ThreadedServer(app).start()
    yield server.url
    server.stop()


@pytest.mark.parametrize("n", [0, 1, 7])
def test_lean_route_serialises_byte_for_byte_like_fastapi(tiny: str, n: int) -> None:
    lean = httpx.get(f"{tiny}/v1/points/{n}")
    full = httpx.get(f"{tiny}/v1/points/{n}?full=1")
    assert lean.status_code == full.status_code == 200
    assert lean.content == full.content
    assert lean.headers["content-type"] == full.headers["content-type"]
    assert lean.headers["content-length"] == full.headers["content-length"]
    assert "y" not in lean.json()  # exclude_unset applies


@pytest.mark.parametrize("n", range(len(RESULTS)))
def test_fixation_results_serialise_byte_for_byte_like_fastapi(tiny: str, n: int) -> None:
    lean = httpx.get(f"{tiny}/v1/results/{n}")
    full = httpx.get(f"{tiny}/v1/results/{n}?full=1")
    assert lean.status_code == full.status_code == 200
    assert lean.content == full.content
    assert lean.json() == {k: v for k, v in RESULTS[n].items()}  # exclude_unset: only what was sent


def test_lean_route_falls_back_to_fastapi_validation(tiny: str) -> None:
    r = httpx.get(f"{tiny}/v1/points/abc")  # the int path parameter: only FastAPI validates it
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "n"]


def test_without_fastapis_serialiser_the_route_is_fastapis_own(tiny: str) -> None:
    """A FastAPI older than the serialisation lean.py copies: the lean path is not used at all, and
    FastAPI's handler answers (the endpoint's point, not the lean coroutine's marked answer)."""
    marked = httpx.get(f"{tiny}/v1/marked/3")
    assert marked.status_code == 200 and marked.headers.get("x-answered-by") == "lean"  # the control
    old = httpx.get(f"{tiny}/v1/old/3")
    assert old.status_code == 200 and "x-answered-by" not in old.headers
    assert old.json() == point(3).model_dump()
