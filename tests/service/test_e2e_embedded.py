"""End to end in one process: ``foveate serve`` (embedded queue) and ``foveate serve --redis URL``."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest
import redis

from tests.service._support import Scanpath, ServiceProcess, free_port, learn_passes, post_patch, scrape

pytestmark = pytest.mark.slow  # two process starts with torch

GRACEFUL = (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled after a clean shutdown


def test_embedded_serve_learns_and_restarts_from_its_checkpoint(
    osie: list[Scanpath], tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "FOVEATE_CHECKPOINT_PATH": str(tmp_path / "ckpt.pt"),
        "FOVEATE_LR": "0.03",
        # the cosine loss: whitened_mse's running metric is still settling over a few dozen fixations
        "FOVEATE_LOSS": "cosine",
        "FOVEATE_REDIS_URL": "",
    }
    serve = ServiceProcess(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    processes.append(serve)
    serve.wait_http(url + "/readyz")
    client = httpx.Client(base_url=url, timeout=60.0)
    assert client.get("/readyz").json()["mode"] == "embedded"

    means = learn_passes(client, osie[:2], 3)
    assert means[-1] < 0.6 * means[0], means
    n = 3 * sum(len(p.patches) for p in osie[:2])
    metrics = scrape(url + "/metrics")  # one endpoint serves the API's and the worker's metrics
    assert metrics[("foveate_fixations_total", ())] == n
    route = (("method", "POST"), ("route", "/v1/streams/{stream_id}/fixations"), ("status", "200"))
    assert metrics[("foveate_http_requests_total", route)] == n
    assert metrics[("foveate_worker_up", ())] == 1

    before = client.get("/v1/streams/learn-0").json()
    updates = client.get("/v1/model").json()["updates_applied"]
    # Graceful: the lifespan writes the checkpoint; uvicorn then re-raises SIGTERM (exit -15).
    assert serve.stop(signal.SIGTERM) in GRACEFUL
    assert (tmp_path / "ckpt.pt").exists()

    again = ServiceProcess(["serve", "--port", str(port)], env, tmp_path / "serve2.log")
    processes.append(again)
    again.wait_http(url + "/readyz")
    restored = client.get("/v1/streams/learn-0").json()
    assert (restored["step"], restored["fixations"], restored["last_seq"]) == (
        before["step"],
        before["fixations"],
        before["last_seq"],
    )
    assert client.get("/v1/model").json()["updates_applied"] == updates
    out = post_patch(client, "learn-0", osie[0].patches[0], seq=100)
    assert out["step"] == before["step"] + 1 and out["updates_applied"] == updates + 1


def test_serve_with_redis_takes_http_and_rig_fixations(
    redis_server: str, osie: list[Scanpath], tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = ServiceProcess(
        ["serve", "--port", str(port), "--redis", redis_server],
        {"FOVEATE_CHECKPOINT_PATH": ""},
        tmp_path / "serve.log",
    )
    processes.append(serve)
    serve.wait_http(url + "/readyz")
    client = httpx.Client(base_url=url, timeout=60.0)
    assert client.get("/readyz").json()["mode"] == "redis"
    assert post_patch(client, "web", osie[0].patches[0])["step"] == 1

    r = redis.Redis.from_url(redis_server)
    patch = osie[0].patches[1]
    r.xadd(
        "foveate:fixations",
        {"stream_id": "web", "raw": patch.tobytes(), "shape": "64,64,3", "request_id": "q"},
    )
    item = r.blpop(["foveate:result:q"], timeout=60)
    assert item is not None and json.loads(item[1])["step"] == 2
    metrics = scrape(url + "/metrics")
    assert metrics[("foveate_fixations_total", ())] == 2
    unavailable = client.post("/v1/model/checkpoint", json={})
    assert unavailable.status_code == 422 and "FOVEATE_CHECKPOINT_PATH" in unavailable.json()["detail"]
    assert serve.stop(signal.SIGTERM) in GRACEFUL
