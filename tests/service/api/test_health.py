"""/healthz, /readyz, /metrics and the OpenAPI document."""

from __future__ import annotations

import base64

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.service._support import Scanpath, ThreadedServer, png


def _samples(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_health_and_readiness(embedded: ThreadedServer) -> None:
    client = httpx.Client(base_url=embedded.url)
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["mode"] == "embedded"


def test_metrics_move_with_traffic(embedded: ThreadedServer, osie: list[Scanpath]) -> None:
    client = httpx.Client(base_url=embedded.url, timeout=60.0)
    before = _samples(client)
    for patch in osie[2].patches[:3]:
        client.post(
            "/v1/streams/metrics-test/fixations", json={"patch_b64": base64.b64encode(png(patch)).decode()}
        )
    client.post("/v1/streams/metrics-test/fixations", json={"patch_b64": "AA=="})
    after = _samples(client)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("foveate_fixations_total") == 3
    assert delta("foveate_prediction_error_count") == 2  # steps 2 and 3 are scored
    assert delta("foveate_step_error_count", step="2") == 1
    assert delta("foveate_rejected_requests_total", reason="bad_input") == 1
    route = "/v1/streams/{stream_id}/fixations"
    assert delta("foveate_http_requests_total", route=route, method="POST", status="200") == 3
    assert after[("foveate_worker_up", ())] == 1.0
    assert after[("foveate_active_streams", ())] >= 1
    assert all(name.startswith("foveate_") for name, _ in after)
    labels = {key for _, pairs in after for key, _ in pairs}
    assert "stream_id" not in labels  # stream ids never become label values


def test_openapi_documents_both_body_types(embedded: ThreadedServer) -> None:
    spec = httpx.get(embedded.url + "/openapi.json").json()
    post = spec["paths"]["/v1/streams/{stream_id}/fixations"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert {"200", "202", "413", "422", "504"} <= set(post["responses"])
    for path in (
        "/v1/streams",
        "/v1/streams/{stream_id}/reset",
        "/v1/model/checkpoint",
        "/v1/fixations/batch",
    ):
        assert path in spec["paths"]
