"""POST /v1/streams/{id}/fixations and /v1/fixations/batch on a real uvicorn (embedded mode)."""

from __future__ import annotations

import base64
import math
import time
from typing import Any

import httpx
import numpy as np
import pytest

from tests.service._support import Scanpath, ThreadedServer, png, scrape


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def client(embedded: ThreadedServer) -> httpx.Client:
    return httpx.Client(base_url=embedded.url, timeout=60.0)


def check_scores(results: list[dict[str, Any]]) -> None:
    """Each result's repeat baseline and skill agree with its error (docs/api.md)."""
    for r in results:
        assert isinstance(r["skipped"], bool)
        if r["error"] is None:  # nothing predicted: no baseline either
            assert r["repeat_error"] is None and r["skill"] is None and r["skipped"] is False
            continue
        assert 0.0 <= r["repeat_error"] < math.inf
        if r["repeat_error"] > 0:
            assert r["skill"] == pytest.approx(1 - r["error"] / r["repeat_error"], rel=1e-12)
        else:
            assert r["skill"] is None


def test_every_payload_kind_is_learned_from(client: httpx.Client, osie: list[Scanpath]) -> None:
    path = osie[0]
    (x0, y0, _), (_, _, d1), (x2, y2, _) = path.fixations[:3]
    p0, p1, p3 = path.patches[0], path.patches[1], path.patches[3]
    sent = [
        client.post(
            "/v1/streams/kinds/fixations",
            json={"seq": 0, "t": 0.0, "duration_ms": 250, "reset": True, "patch_b64": b64(png(p0))},
        ),
        client.post(
            "/v1/streams/kinds/fixations",
            json={"seq": 1, "duration_ms": d1, "raw_b64": b64(p1.tobytes()), "shape": list(p1.shape)},
        ),
        client.post(
            "/v1/streams/kinds/fixations",
            json={
                "seq": 2,
                "frame_b64": b64(path.jpeg),
                "x": x2,
                "y": y2,
                "size_deg": 2.0,
                "px_per_deg": 32.0,
            },
        ),
        client.post(
            "/v1/streams/kinds/fixations",
            files={"patch": ("p.png", png(p3), "image/png")},
            data={"seq": "3", "t": "0.9"},
        ),
        client.post(
            "/v1/streams/kinds/fixations?return_prediction=true",
            files={"frame": ("f.jpg", path.jpeg)},
            data={"seq": "4", "x": str(x0), "y": str(y0), "size_px": "64"},
        ),
    ]
    assert [r.status_code for r in sent] == [200] * 5, [r.text for r in sent]
    body = [r.json() for r in sent]
    assert [b["step"] for b in body] == [1, 2, 3, 4, 5]
    assert [b["seq"] for b in body] == [0, 1, 2, 3, 4]
    assert body[0]["error"] is None and all(0.0 <= b["error"] < math.inf for b in body[1:])
    assert body[-1]["running_error"] is not None
    check_scores(body)
    assert "prediction" not in body[0] and len(body[-1]["prediction"]) == 16
    assert body[-1]["updates_applied"] > body[1]["updates_applied"]


def test_wait_false_answers_202_then_the_fixation_is_applied(
    client: httpx.Client, osie: list[Scanpath]
) -> None:
    r = client.post(
        "/v1/streams/async/fixations?wait=false", json={"seq": 0, "patch_b64": b64(png(osie[1].patches[0]))}
    )
    assert r.status_code == 202
    assert r.json()["status"] == "queued" and len(r.json()["request_id"]) == 32
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = client.get("/v1/streams/async")
        if info.status_code == 200:
            assert info.json()["fixations"] == 1
            return
        time.sleep(0.1)
    raise AssertionError("the queued fixation was never applied")


def _many_pixels() -> bytes:
    return png(np.zeros((1100, 1000, 3), np.uint8))  # 1.1 M pixels, a small file


BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str, str]] = [
    (
        "malformed JSON",
        {"content": b'{"seq": 1,', "headers": {"content-type": "application/json"}},
        400,
        "MalformedRequest",
        "not valid JSON",
    ),
    (
        "empty body",
        {"content": b"", "headers": {"content-type": "application/json"}},
        400,
        "MalformedRequest",
        "JSON",
    ),
    ("no image", {"json": {"seq": 1}}, 422, "InputError", "exactly one image"),
    (
        "two images",
        {"json": {"patch_b64": "AA==", "frame_b64": "AA=="}},
        422,
        "InputError",
        "exactly one image",
    ),
    ("not base64", {"json": {"patch_b64": "%%%"}}, 422, "InputError", "not valid base64"),
    ("undecodable", {"json": {"patch_b64": b64(b"GIF89a....")}}, 422, "PatchError", "cannot decode"),
    ("raw length", {"json": {"raw_b64": b64(bytes(10)), "shape": [2, 2, 3]}}, 422, "PatchError", "length"),
    (
        "raw channels",
        {"json": {"raw_b64": b64(bytes(16)), "shape": [2, 2, 4]}},
        422,
        "PatchError",
        "channels",
    ),
    ("raw no shape", {"json": {"raw_b64": b64(bytes(12))}}, 422, "InputError", "shape"),
    (
        "NaN time",
        {"content": b'{"t": NaN, "patch_b64": "AA=="}', "headers": {"content-type": "application/json"}},
        422,
        "InputError",
        "t:",
    ),
    ("negative seq", {"json": {"seq": -1, "patch_b64": "AA=="}}, 422, "InputError", "seq"),
    ("unknown field", {"json": {"patch_b64": "AA==", "colour": "red"}}, 422, "InputError", "colour"),
    (
        "too many pixels",
        {"json": {"patch_b64": b64(_many_pixels())}},
        422,
        "PatchError",
        "more than the limit",
    ),
    ("frame without gaze", {"json": {"frame_b64": "AA==", "size_px": 32}}, 422, "InputError", "x and y"),
    (
        "gaze off frame",
        {
            "files": {"frame": ("f.png", png(np.zeros((40, 40, 3), np.uint8)))},
            "data": {"x": "900", "y": "5", "size_px": "16"},
        },
        422,
        "PatchError",
        "off the frame",
    ),
    (
        "text instead of file",
        {"files": {"x": ("a", b"1")}, "data": {"patch": "abc"}},
        422,
        "InputError",
        "file part",
    ),
    ("unknown file part", {"files": {"picture": ("p.png", b"x")}}, 422, "InputError", "not known"),
    (
        "multipart without a boundary",
        {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
        400,
        "MalformedRequest",
        "multipart body",
    ),
    ("too large", {"json": {"patch_b64": "A" * 2_100_000}}, 413, "PayloadTooLarge", "over the limit"),
]


@pytest.mark.parametrize(
    ("case", "request_kw", "status", "error", "detail"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_input_is_a_clear_4xx(
    client: httpx.Client, case: str, request_kw: dict[str, Any], status: int, error: str, detail: str
) -> None:
    r = client.post("/v1/streams/victim/fixations", **request_kw)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == error and detail in body["detail"], body


def test_chunked_oversized_body_is_413(client: httpx.Client) -> None:
    def chunks() -> Any:
        for _ in range(30):
            yield b"A" * 100_000  # no Content-Length: the limit is enforced while reading

    r = client.post(
        "/v1/streams/victim/fixations", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"


def test_bad_stream_id_is_422(client: httpx.Client) -> None:
    r = client.post("/v1/streams/no%20spaces/fixations", json={"patch_b64": "AA=="})
    assert r.status_code == 422 and "stream_id" in r.json()["detail"]


def test_bad_input_leaves_worker_and_other_streams_unaffected(
    client: httpx.Client, osie: list[Scanpath]
) -> None:
    patches = osie[2].patches
    first = client.post("/v1/streams/steady/fixations", json={"patch_b64": b64(png(patches[0]))}).json()
    for _, kw, *_ in BAD_REQUESTS[:8]:
        assert client.post("/v1/streams/steady/fixations", **kw).status_code < 500
    second = client.post("/v1/streams/steady/fixations", json={"patch_b64": b64(png(patches[1]))}).json()
    assert (first["step"], second["step"]) == (1, 2)  # the bad requests never reached the stream
    assert client.get("/readyz").status_code == 200


def test_batch_mixes_results_and_rejections_in_order(client: httpx.Client, osie: list[Scanpath]) -> None:
    p = osie[1].patches
    items = [
        {"stream_id": "batch-a", "seq": 0, "patch_b64": b64(png(p[0]))},
        {"stream_id": "batch-b", "seq": 0, "raw_b64": b64(p[1].tobytes()), "shape": list(p[1].shape)},
        {"stream_id": "batch-a", "seq": 1, "patch_b64": b64(b"junk")},
        {"stream_id": "batch-a", "seq": 2, "patch_b64": b64(png(p[2]))},
    ]
    r = client.post("/v1/fixations/batch", json={"fixations": items})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["ok"] for x in res] == [True, True, False, True]
    assert res[2]["rejected"]["error"] == "PatchError"
    assert [(x["result"]["stream_id"], x["result"]["step"]) for x in res if x["ok"]] == [
        ("batch-a", 1),
        ("batch-b", 1),
        ("batch-a", 2),
    ]
    check_scores([x["result"] for x in res if x["ok"]])
    assert res[3]["result"]["repeat_error"] is not None  # batch-a's second fixation was scored
    queued = client.post("/v1/fixations/batch?wait=false", json={"fixations": items[:1]}).json()["results"]
    assert queued[0]["accepted"]["status"] == "queued"


def test_batch_limits(client: httpx.Client) -> None:
    item = {"stream_id": "x", "patch_b64": "AA=="}
    r = client.post("/v1/fixations/batch", json={"fixations": [item] * 9})
    assert r.status_code == 413 and "FOVEATE_MAX_BATCH_FIXATIONS" in r.json()["detail"]
    r = client.post("/v1/fixations/batch", json={"fixations": [{**item, "stream_id": "bad id"}]})
    assert r.status_code == 422 and "fixations.0.stream_id" in r.json()["detail"]
    assert client.post("/v1/fixations/batch", json={"fixations": []}).status_code == 422


def _counters(url: str) -> dict[str, float]:
    got = scrape(url + "/metrics")
    names = ("duplicates", "seq_gaps", "seq_missing", "seq_late", "fixations")
    return {n: got.get((f"foveate_{n}_total", ()), 0.0) for n in names}


def test_a_seq_is_applied_once_and_its_retries_get_the_original_result(
    client: httpx.Client, embedded: ThreadedServer, osie: list[Scanpath]
) -> None:
    # A client that retries (its connection dropped after the server applied the fixation) sends the
    # same seq and image again: the answer is the first one, and nothing is learned twice.
    patches = osie[0].patches
    before = _counters(embedded.url)
    body = []
    for seq in [0, 1, 2, 2, 1, 0, 5, 4]:
        patch = patches[seq % len(patches)]
        r = client.post(
            "/v1/streams/once/fixations", json={"seq": seq, "reset": seq == 0, "patch_b64": b64(png(patch))}
        )
        assert r.status_code == 200, r.text
        body.append(r.json())
    assert [b["status"] for b in body] == ["applied"] * 3 + ["duplicate"] * 3 + ["applied", "late"]
    assert [b["step"] for b in body] == [1, 2, 3, 3, 2, 1, 4, None]
    assert [b["gap"] for b in body] == [0, 0, 0, 0, 0, 0, 2, 0]  # seqs 3 and 4 had not come by 5
    assert body[-1]["error"] is None  # 4 came after 5: too late to learn from in order
    for dup, first in ((3, 2), (4, 1), (5, 0)):
        assert body[dup]["request_id"] != body[first]["request_id"]
        same = {k: v for k, v in body[dup].items() if k not in ("status", "request_id")}
        assert same == {k: v for k, v in body[first].items() if k not in ("status", "request_id")}
    info = client.get("/v1/streams/once").json()
    assert (info["step"], info["fixations"], info["last_seq"]) == (4, 4, 5)
    after = _counters(embedded.url)
    assert {k: after[k] - before[k] for k in after} == {
        "duplicates": 3, "seq_gaps": 1, "seq_missing": 2, "seq_late": 1, "fixations": 4
    }  # fmt: skip

    # A retried batch is answered from the same results, in order.
    items = [
        {"stream_id": "once-batch", "seq": i, "reset": i == 0, "patch_b64": b64(png(patches[i]))}
        for i in range(3)
    ]
    first = client.post("/v1/fixations/batch", json={"fixations": items}).json()["results"]
    again = client.post("/v1/fixations/batch", json={"fixations": items}).json()["results"]
    assert [a["result"]["status"] for a in again] == ["duplicate"] * 3
    for a, b in zip(first, again, strict=True):
        assert {k: v for k, v in a["result"].items() if k not in ("status", "request_id")} == {
            k: v for k, v in b["result"].items() if k not in ("status", "request_id")
        }
    assert client.get("/v1/streams/once-batch").json()["fixations"] == 3
