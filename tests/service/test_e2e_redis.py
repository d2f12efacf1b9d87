"""End to end over Redis: ``foveate api`` and ``foveate worker`` as separate processes, a real redis-server.

OSIE fixations go in over HTTP and by XADD (as a rig would); the test checks the answers, that the
model learns, resets and deletes, both /metrics endpoints, a bad message, the takeover of a dead
consumer's entries, and that a restarted worker continues from its checkpoint.
"""

from __future__ import annotations

import base64
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.service._support import Scanpath, ServiceProcess, free_port, learn_passes, png, post_patch, scrape

pytestmark = pytest.mark.slow  # three process starts with torch: about 30-60 s on 2 cores


class Stack:
    """The API and worker processes of one test, sharing a Redis and a checkpoint path."""

    def __init__(self, redis_url: str, tmp: Path, processes: list[ServiceProcess]) -> None:
        self.tmp, self.processes = tmp, processes
        self.api_port, self.metrics_port = free_port(), free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.env = {
            "FOVEATE_REDIS_URL": redis_url,
            "FOVEATE_CHECKPOINT_PATH": str(tmp / "ckpt.pt"),
            "FOVEATE_CLAIM_IDLE_MS": "1000",
            "FOVEATE_WORKER_METRICS_HOST": "127.0.0.1",
            "FOVEATE_WORKER_METRICS_PORT": str(self.metrics_port),
            "FOVEATE_PORT": str(self.api_port),
            "FOVEATE_LR": "0.03",  # a few passes over two scanpaths must show learning
            # the cosine loss: whitened_mse's running metric is still settling over a few dozen fixations
            "FOVEATE_LOSS": "cosine",
        }

    def start(self, command: str) -> ServiceProcess:
        proc = ServiceProcess([command], self.env, self.tmp / f"{command}.log")
        self.processes.append(proc)
        return proc


def _xadd_frame(r: redis.Redis, path: Scanpath, i: int, request_id: str, **extra: Any) -> None:
    x, y, duration = path.fixations[i]
    fields = {
        "stream_id": "rig",
        "seq": i,
        "t": 0.3 * i,
        "duration_ms": duration,
        "reset": int(i == 0),
        "frame": path.jpeg,
        "x": x,
        "y": y,
        "size_px": 64,
        "request_id": request_id,
        **extra,
    }
    r.xadd("foveate:fixations", fields)  # type: ignore[arg-type]


def _reply(r: redis.Redis, request_id: str) -> dict[str, Any]:
    item = r.blpop([f"foveate:result:{request_id}"], timeout=60)
    assert item is not None, f"no reply for {request_id}"
    return dict(json.loads(item[1]))


def test_api_and_worker_over_redis(
    redis_server: str, osie: list[Scanpath], tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    stack = Stack(redis_server, tmp_path, processes)
    worker, api = stack.start("worker"), stack.start("api")
    api.wait_http(stack.api_url + "/readyz")
    client = httpx.Client(base_url=stack.api_url, timeout=60.0)
    r = redis.Redis.from_url(redis_server)

    # --- learning over HTTP: three passes over two scanpaths; the last pass predicts better
    passes = 3
    means = learn_passes(client, osie[:2], passes)
    assert means[-1] < 0.6 * means[0], means
    updates = client.get("/v1/model").json()["updates_applied"]
    assert updates >= sum(len(p.patches) for p in osie[:2])

    # --- a rig XADDs frames with gaze points; replies by request id and in the results streams
    path = osie[2]
    for i in range(3):
        _xadd_frame(r, path, i, f"rig-{i}")
    replies = [_reply(r, f"rig-{i}") for i in range(3)]
    assert [x["step"] for x in replies] == [1, 2, 3] and replies[0]["error"] is None
    assert [e[1][b"step"] for e in r.xrange("foveate:results:rig")] == [b"1", b"2", b"3"]
    # Each scored reply carries the repeat baseline and the skill, also in the results stream.
    assert (replies[0]["repeat_error"], replies[0]["skill"]) == (None, None)
    for reply, (_, fields) in zip(replies[1:], r.xrange("foveate:results:rig")[1:], strict=True):
        assert reply["skill"] == pytest.approx(1 - reply["error"] / reply["repeat_error"], rel=1e-12)
        assert float(fields[b"repeat_error"]) == reply["repeat_error"]
        assert float(fields[b"skill"]) == reply["skill"]
        assert fields[b"skipped"] == (b"1" if reply["skipped"] else b"0")
    # A broken message is answered with its error and acknowledged; the next one still works.
    r.xadd("foveate:fixations", {"stream_id": "rig", "patch": b"not an image", "request_id": "bad"})
    assert _reply(r, "bad")["error"] == "PatchError"
    _xadd_frame(r, path, 3, "rig-3")
    applied = _reply(r, "rig-3")
    assert applied["step"] == 4
    # The rig sends seq 3 again (it did not see the reply): the original result, nothing applied twice.
    _xadd_frame(r, path, 3, "rig-3-again")
    again = _reply(r, "rig-3-again")
    assert again["status"] == "duplicate" and (again["step"], again["error"]) == (4, applied["error"])
    assert r.xpending("foveate:fixations", "foveate-workers")["pending"] == 0

    # --- reset and delete travel to the worker through the control stream
    assert client.post("/v1/streams/learn-0/reset", json={}).json()["step"] == 0
    assert post_patch(client, "learn-0", osie[0].patches[0])["step"] == 1
    assert client.delete("/v1/streams/learn-1").json()["deleted"] is True
    assert client.get("/v1/streams/learn-1").status_code == 404
    assert client.get("/v1/streams/nobody").json()["error"] == "UnknownStream"
    bad = client.post("/v1/streams/learn-0/fixations", json={"patch_b64": "AA=="})
    assert bad.status_code == 422 and bad.json()["error"] == "PatchError"

    # --- metrics: the worker's on its own port, the API's on /metrics
    wm, am = scrape(stack.metrics_url), scrape(stack.api_url + "/metrics")
    n_fix = passes * sum(len(p.patches) for p in osie[:2]) + 4 + 1  # the duplicate is not applied
    assert wm[("foveate_fixations_total", ())] == n_fix and wm[("foveate_duplicates_total", ())] == 1
    assert wm[("foveate_rejected_messages_total", (("reason", "bad_input"),))] >= 1
    assert wm[("foveate_worker_up", ())] == 1 and wm[("foveate_active_streams", ())] == 2
    assert wm[("foveate_resets_total", ())] >= 1 and wm[("foveate_updates_total", ())] >= updates
    assert ("foveate_fixations_total", ()) not in am  # the API process serves only its own metrics
    route = (("method", "POST"), ("route", "/v1/streams/{stream_id}/fixations"), ("status", "200"))
    assert am[("foveate_http_requests_total", route)] == passes * sum(len(p.patches) for p in osie[:2]) + 1

    # --- graceful restart: SIGTERM checkpoints; fixations sent meanwhile wait in Redis
    steps_before = client.get("/v1/streams/rig").json()["step"]
    updates_before = client.get("/v1/model").json()["updates_applied"]
    assert worker.stop(signal.SIGTERM) == 0
    assert (tmp_path / "ckpt.pt").exists()
    # A consumer that reads an entry and dies without acknowledging it: the next worker takes it over.
    _xadd_frame(r, path, 4, "orphan")
    ghost = r.xreadgroup("foveate-workers", "ghost", {"foveate:fixations": ">"}, count=10)
    assert len(ghost[0][1]) == 1
    raw = base64.b64encode(path.patches[5].tobytes()).decode()
    queued = client.post(
        "/v1/streams/rig/fixations?wait=false",
        json={"seq": 99, "raw_b64": raw, "shape": list(path.patches[5].shape)},
    )
    assert queued.status_code == 202
    deadline = time.monotonic() + 30
    while client.get("/readyz").status_code != 503:  # the heartbeat ages out
        assert time.monotonic() < deadline, "readyz stayed 200 with no worker"
        time.sleep(0.5)
    down = client.post(
        "/v1/streams/rig/fixations", json={"patch_b64": base64.b64encode(png(path.patches[0])).decode()}
    )
    assert down.status_code == 503 and down.json()["error"] == "WorkerUnavailable"  # not queued: wait=true

    stack.start("worker")
    api.wait_http(stack.api_url + "/readyz")
    assert _reply(r, "orphan")["step"] == steps_before + 1  # re-read at start: it came after the checkpoint
    deadline = time.monotonic() + 60
    while client.get("/v1/streams/rig").json()["step"] < steps_before + 2:
        assert time.monotonic() < deadline, "the queued fixation was not applied after the restart"
        time.sleep(0.2)
    info = client.get("/v1/streams/rig").json()
    assert info["step"] == steps_before + 2 and info["last_seq"] == 99
    assert client.get("/v1/model").json()["updates_applied"] == updates_before + 2
    assert r.xpending("foveate:fixations", "foveate-workers")["pending"] == 0
    assert client.get("/v1/streams/learn-0").json()["step"] == 1  # other streams came back too


def test_api_refuses_to_start_without_redis(tmp_path: Path) -> None:
    proc = ServiceProcess(["api"], {"FOVEATE_REDIS_URL": ""}, tmp_path / "api.log")
    assert proc.process.wait(timeout=120) == 1
    proc.stop()
    assert "needs Redis" in proc.tail()
