"""/v1/streams: list, inspect, prediction, reset, delete, on a real uvicorn (embedded mode)."""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.service._support import Scanpath, ThreadedServer, png


@pytest.fixture
def client(embedded: ThreadedServer) -> httpx.Client:
    return httpx.Client(base_url=embedded.url, timeout=60.0)


def _post(client: httpx.Client, stream: str, patch: object, **fields: object) -> dict[str, object]:
    r = client.post(
        f"/v1/streams/{stream}/fixations", json={"patch_b64": base64.b64encode(png(patch)).decode(), **fields}
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_stream_lifecycle(client: httpx.Client, osie: list[Scanpath]) -> None:
    patches = osie[0].patches
    posted = [_post(client, "life", patches[i], seq=10 + i, t=1.0 + i) for i in range(3)]
    listed = client.get("/v1/streams").json()
    assert listed["count"] == len(listed["streams"]) >= 1
    assert {"stream_id": "life", "step": 3, "fixations": 3, "last_seq": 12}.items() <= next(
        s for s in listed["streams"] if s["stream_id"] == "life"
    ).items()

    info = client.get("/v1/streams/life").json()
    assert (info["step"], info["scored"], info["last_seq"], info["last_t"]) == (3, 2, 12, 3.0)
    assert [e["step"] for e in info["recent_errors"]] == [2, 3]
    # The repeat baseline beside the model's errors: per fixation as the POSTs answered, and summed.
    scored = posted[1:]
    assert [(e["error"], e["repeat_error"]) for e in info["recent_errors"]] == [
        (p["error"], p["repeat_error"]) for p in scored
    ]
    assert info["last_repeat_error"] == scored[-1]["repeat_error"]
    assert info["mean_repeat_error"] == pytest.approx(sum(p["repeat_error"] for p in scored) / 2)
    assert info["skill"] == pytest.approx(
        1 - sum(p["error"] for p in scored) / sum(p["repeat_error"] for p in scored)
    )
    assert info["skipped"] == sum(p["skipped"] for p in scored)
    assert info["created_at"] <= info["updated_at"] and info["state"]["step"] == 3

    pred = client.get("/v1/streams/life/prediction").json()
    assert pred["step"] == 3 and len(pred["prediction"]) == 16

    assert client.post("/v1/streams/life/reset", json={}).json() == {"stream_id": "life", "step": 0}
    assert client.get("/v1/streams/life/prediction").json()["prediction"] is None
    after = _post(client, "life", patches[3])
    assert after["step"] == 1 and after["error"] is None  # a reset starts a new, unscored sequence
    assert client.get("/v1/streams/life").json()["resets"] == 1

    assert client.delete("/v1/streams/life").json() == {"stream_id": "life", "deleted": True}
    gone = client.get("/v1/streams/life")
    assert gone.status_code == 404 and gone.json()["error"] == "UnknownStream"
    assert all(s["stream_id"] != "life" for s in client.get("/v1/streams").json()["streams"])


def test_reset_flag_on_a_fixation(client: httpx.Client, osie: list[Scanpath]) -> None:
    patches = osie[1].patches
    _post(client, "flag", patches[0])
    assert _post(client, "flag", patches[1])["step"] == 2
    again = _post(client, "flag", patches[2], reset=True)
    assert again["step"] == 1 and again["error"] is None


@pytest.mark.parametrize(
    ("method", "path"), [("GET", ""), ("GET", "/prediction"), ("POST", "/reset"), ("DELETE", "")]
)
def test_unknown_stream_is_404(client: httpx.Client, method: str, path: str) -> None:
    r = client.request(method, f"/v1/streams/never-seen{path}", json={} if method == "POST" else None)
    assert r.status_code == 404
    assert r.json() == {
        "error": "UnknownStream",
        "detail": "no stream 'never-seen': it has received no fixation yet, or was deleted",
    }


def test_invalid_stream_id_is_422(client: httpx.Client) -> None:
    r = client.get("/v1/streams/" + "x" * 129)
    assert r.status_code == 422 and r.json()["error"] == "InputError"
