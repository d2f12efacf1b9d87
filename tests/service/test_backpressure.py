"""Back-pressure that reaches clients (issue 16): commands overtake queued fixations, ``/readyz`` turns
not-ready when the backlog cannot be served within the sync timeout, every 429/503 tells the client
when to come back.

The worker is held still by taking its tick lock (``worker._lock``), as a long tick would hold it:
what is queued meanwhile stays queued, so no assertion depends on how fast the machine is. Where a
service rate is needed, the test reports it as the worker's heartbeat would (``broker.heartbeat`` in
process, the heartbeat key over Redis), so the expected ``Retry-After`` can be computed exactly.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from service.backpressure import ServiceRate, drain_seconds, overdue, queue_full_retry_after, refuse_waiting
from service.broker import Inbox
from service.messages import Control, Fixation
from tests.service._support import ThreadedServer, png, small_settings

PATCH = np.random.default_rng(16).integers(0, 256, (32, 32, 3), dtype=np.uint8)
BODY = {"patch_b64": base64.b64encode(png(PATCH)).decode()}
RAW = {"raw": PATCH.tobytes(), "shape": "32,32,3"}


def _until(done: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


# ---------------------------------------------------------------- the pieces


def test_service_rate_is_served_per_busy_second_and_forgets_old_ticks() -> None:
    rate = ServiceRate(horizon_s=1.0)
    assert rate.per_second() is None
    rate.observe(10, 1.0)
    assert rate.per_second() == pytest.approx(10.0)
    for _ in range(50):  # a long run of faster ticks outweighs the old one
        rate.observe(40, 0.1)
    assert rate.per_second() == pytest.approx(400.0, rel=0.01)
    assert rate.tick_seconds() == pytest.approx(0.1, rel=0.01)  # the same horizon for the tick time


def test_a_stream_with_more_fixations_than_ticks_fit_is_refused() -> None:
    """A stream gets one fixation a tick: a waiting request with k of one stream needs k ticks, however
    fast the worker serves fixations in all (a soak's batches of 64 answered 504 before this)."""
    fast = dict(rate=1000.0, timeout_s=10.0, tick_s=0.5)
    assert refuse_waiting(0, 64, deepest=1, **fast) is None  # 64 streams, one each: one tick
    assert refuse_waiting(0, 20, deepest=20, **fast) is None  # 20 ticks of 0.5 s: just in time
    assert refuse_waiting(0, 64, deepest=64, **fast) == pytest.approx(22.0)  # 32 s, 22 s late
    assert refuse_waiting(0, 64, deepest=64, rate=1000.0, timeout_s=10.0) is None  # no tick time yet
    assert refuse_waiting(20_000, 1, deepest=1, **fast) == pytest.approx(10.001)  # the backlog still counts


def test_drain_and_overdue() -> None:
    assert drain_seconds(100, None) is None and drain_seconds(100, 0.0) is None
    assert overdue(100, 10.0, timeout_s=10.0) is None  # exactly servable in time
    assert overdue(101, 10.0, timeout_s=10.0) == pytest.approx(0.1)
    assert overdue(10**6, None, timeout_s=10.0) is None  # unknown rate: no verdict
    assert queue_full_retry_after(3, 2.0) == pytest.approx(1.5)
    assert queue_full_retry_after(3, None) == 1.0


def test_inbox_gives_commands_first_and_bounds_fixations() -> None:
    box = Inbox(capacity=2, command_capacity=1)
    assert box.put_fixation(Fixation("a", seq=0)) and box.put_fixation(Fixation("a", seq=1))
    assert not box.put_fixation(Fixation("a", seq=2), timeout=0.01)  # full
    assert box.put_command(Control("model")) and not box.put_command(Control("ping"))
    first = box.get(0)
    assert isinstance(first, Control) and first.command == "model"
    second = box.get(0)
    assert isinstance(second, Fixation) and second.seq == 0
    box.put_command(Control("ping"))
    assert [c.command for c in box.commands()] == ["ping"] and box.command_count() == 0
    assert box.fixations() == 1


# ---------------------------------------------------------------- the embedded service


@contextmanager
def _embedded(**settings: Any) -> Iterator[tuple[ThreadedServer, Any]]:
    from service.api.main import create_app

    app = create_app(small_settings(max_batch=1, heartbeat_timeout_s=600.0, **settings))
    server = ThreadedServer(app).start()
    try:
        yield server, app
    finally:
        server.stop()


@contextmanager
def _held(worker: Any) -> Iterator[None]:
    """The worker's tick lock, taken as a long tick would take it; released on leaving."""
    worker._lock.acquire()
    try:
        yield
    finally:
        worker._lock.release()


def _ask_in_thread(url: str) -> tuple[threading.Thread, dict[str, Any]]:
    answer: dict[str, Any] = {}

    def ask() -> None:
        r = httpx.get(url, timeout=60.0)
        answer.update(status=r.status_code, body=r.json())

    thread = threading.Thread(target=ask)
    thread.start()
    return thread, answer


def test_a_command_does_not_wait_behind_queued_fixations_embedded() -> None:
    with _embedded(sync_timeout_s=60.0) as (server, app):
        worker, broker = app.state.worker, app.state.broker
        client = httpx.Client(base_url=server.url, timeout=60.0)
        assert client.post("/v1/streams/a/fixations", json=BODY).status_code == 200
        before = client.get("/v1/model").json()["ticks"]
        with _held(worker):
            for _ in range(20):
                assert client.post("/v1/streams/a/fixations?wait=false", json=BODY).status_code == 202
            thread, answer = _ask_in_thread(server.url + "/v1/model")
            _until(lambda: broker.inbox.command_count() == 1, "the command never reached the inbox")
            assert broker.inbox.fixations() >= 19  # the worker holds one fixation at most
        thread.join(60.0)
        # answered after the one tick the worker was in, not after the 20 queued fixations
        assert answer["status"] == 200 and answer["body"]["ticks"] <= before + 1, answer


def test_queue_full_and_readyz_tell_when_to_come_back_embedded() -> None:
    with _embedded(max_queue=6, sync_timeout_s=1.0) as (server, app):
        worker, broker = app.state.worker, app.state.broker
        client = httpx.Client(base_url=server.url, timeout=60.0)
        assert client.post("/v1/streams/a/fixations", json=BODY).status_code == 200
        with _held(worker):
            assert client.post("/v1/streams/a/fixations?wait=false", json=BODY).status_code == 202
            _until(lambda: broker.inbox.fixations() == 0, "the worker did not take the fixation")
            # the worker now waits in its tick; report the rate its heartbeat would: 2 fixations/s
            broker.heartbeat({"queue_depth": 0, "service_rate": 2.0})
            for _ in range(4):
                assert client.post("/v1/streams/a/fixations?wait=false", json=BODY).status_code == 202
            # one more that waits for its result would be served in (4 + 1) / 2 = 2.5 s, 1.5 s late:
            # refused before it is queued, rather than timed out after it
            late = client.post("/v1/streams/a/fixations", json=BODY)
            assert late.status_code == 429 and late.headers["retry-after"] == "2", late.text
            assert "FOVEATE_SYNC_TIMEOUT_S" in late.json()["detail"]
            for _ in range(2):
                assert client.post("/v1/streams/a/fixations?wait=false", json=BODY).status_code == 202
            batch = {"fixations": [{"stream_id": "a", **BODY}] * 3}
            full = client.post("/v1/fixations/batch?wait=false", json=batch)
            assert full.status_code == 429 and full.json()["error"] == "QueueFull"
            assert full.headers["retry-after"] == "2"  # 3 over the limit at 2/s: 1.5 s, rounded up
            ready = client.get("/readyz")
            # 6 waiting at 2/s take 3 s, 2 s over FOVEATE_SYNC_TIMEOUT_S=1
            assert ready.status_code == 503 and ready.headers["retry-after"] == "2", ready.text
            assert "6 fixations are waiting" in ready.json()["detail"]
        _until(lambda: client.get("/readyz").status_code == 200, "readyz stayed 503 after the backlog")


def test_a_batch_of_one_stream_longer_than_the_timeout_is_refused_embedded() -> None:
    with _embedded(sync_timeout_s=1.0) as (server, app):
        worker, broker = app.state.worker, app.state.broker
        client = httpx.Client(base_url=server.url, timeout=60.0)
        assert client.post("/v1/streams/a/fixations", json=BODY).status_code == 200
        with _held(worker):
            # a fast worker (1,000 fixations/s) whose ticks take 0.4 s: 3 of one stream need 1.2 s
            broker.heartbeat({"queue_depth": 0, "service_rate": 1000.0, "tick_s": 0.4})
            batch = {"fixations": [{"stream_id": "b", **BODY}] * 3 + [{"stream_id": "c", **BODY}]}
            late = client.post("/v1/fixations/batch", json=batch)
            assert late.status_code == 429 and late.json()["error"] == "QueueFull", late.text
            assert late.headers["retry-after"] == "1"  # 0.2 s late, rounded up
            detail = late.json()["detail"]
            assert "3 fixations of stream 'b'" in detail and "at most 2 fixations of one stream" in detail
            assert broker.inbox.fixations() == 0  # refused before anything was queued
        ok = client.post("/v1/fixations/batch", json={"fixations": batch["fixations"][2:]})  # b once, c once
        assert ok.status_code == 200 and all(item["ok"] for item in ok.json()["results"]), ok.text


def test_a_new_stream_over_the_workers_limit_is_told_when_to_come_back_embedded() -> None:
    # refused by the worker and re-raised by the API from the worker's reply (no wait of its own)
    with _embedded(max_streams=2) as (server, _):
        client = httpx.Client(base_url=server.url, timeout=60.0)
        for stream in ("a", "b"):
            assert client.post(f"/v1/streams/{stream}/fixations", json=BODY).status_code == 200
        refused = client.post("/v1/streams/c/fixations", json=BODY)
        assert refused.status_code == 429 and refused.json()["error"] == "TooManyStreams"
        assert refused.headers["retry-after"] == "1"


# ---------------------------------------------------------------- over Redis


def test_readyz_and_refusals_over_redis_carry_retry_after(redis_server: str) -> None:
    from service.api.main import create_app

    settings = small_settings(redis_url=redis_server, max_queue=21, sync_timeout_s=10.0)
    server = ThreadedServer(create_app(settings)).start()  # the API alone, as `foveate api`
    try:
        client = httpx.Client(base_url=server.url, timeout=30.0)
        gone = client.get("/readyz")
        assert gone.status_code == 503 and gone.headers["retry-after"] == "5"
        refused = client.post("/v1/streams/a/fixations", json=BODY)  # wait=true, no worker
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"

        r = redis.Redis.from_url(redis_server)
        beat = {"ts": time.time() + 3600, "queue_depth": 30, "service_rate": 0.5, "tick_s": 4.0}  # a worker's
        r.set(settings.heartbeat_key, json.dumps(beat))
        _until(lambda: client.get("/readyz").json().get("error") != "WorkerUnavailable", "no heartbeat seen")
        late = client.get("/readyz")
        # 30 waiting at 0.5/s take 60 s, 50 over FOVEATE_SYNC_TIMEOUT_S=10
        assert late.status_code == 503 and late.headers["retry-after"] == "50", late.text
        for _ in range(20):
            r.xadd(settings.input_stream, {"stream_id": "a", **RAW})  # type: ignore[arg-type]
        batch = {"fixations": [{"stream_id": "a", **BODY}] * 2}
        full = client.post("/v1/fixations/batch?wait=false", json=batch)
        assert full.status_code == 429 and full.headers["retry-after"] == "2"  # 1 over the 21 at 0.5/s
        late = client.post("/v1/streams/a/fixations", json=BODY)  # fits, but served in 42 s: 32 s late
        assert late.status_code == 429 and late.headers["retry-after"] == "32", late.text
        assert server.app.state.broker._tick_s == 4.0  # the heartbeat's tick time, as the API read it
    finally:
        server.stop()


def test_a_command_does_not_wait_behind_queued_fixations_over_redis(redis_server: str) -> None:
    from service.api.main import create_app
    from service.redis_broker import RedisBroker
    from service.worker import Worker

    settings = small_settings(redis_url=redis_server, max_batch=1, sync_timeout_s=60.0,
                              heartbeat_timeout_s=600.0)  # fmt: skip
    broker = RedisBroker(settings)
    worker = Worker(settings, broker)
    server = ThreadedServer(create_app(settings, broker, worker)).start()  # as `foveate serve --redis`
    try:
        client = httpx.Client(base_url=server.url, timeout=60.0)
        for _ in range(3):
            assert client.post("/v1/streams/a/fixations", json=BODY).status_code == 200
        r = redis.Redis.from_url(redis_server)

        def reported_rate() -> float | None:
            raw = r.get(settings.heartbeat_key)
            return None if raw is None else json.loads(raw).get("service_rate")

        _until(lambda: reported_rate() is not None, "the heartbeat carries no service rate")
        assert reported_rate() > 0  # type: ignore[operator]
        before = client.get("/v1/model").json()["ticks"]
        with _held(worker):
            for _ in range(200):  # more than the inbox holds: the rest wait in Redis
                r.xadd(settings.input_stream, {"stream_id": "b", **RAW})  # type: ignore[arg-type]
            _until(lambda: broker.inbox.fixations() == broker.inbox.capacity, "the inbox did not fill")
            thread, answer = _ask_in_thread(server.url + "/v1/model")
            _until(lambda: broker.inbox.command_count() == 1, "the command never reached the inbox")
        thread.join(60.0)
        assert answer["status"] == 200 and answer["body"]["ticks"] <= before + 1, answer
    finally:
        server.stop()


# ---------------------------------------------------------------- the HTTP server's own limit


@pytest.mark.parametrize("h11_only", [True, False])
def test_over_max_connections_is_503_with_retry_after(h11_only: bool) -> None:
    import uvicorn
    from fastapi import FastAPI

    from service.api.server import uvicorn_config

    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict[str, str]:
        return {"ok": "yes"}

    # uvicorn counts the request's own connection: with a limit of 1 every request is over it
    holder = ThreadedServer(app)
    settings = small_settings(max_connections=1, port=holder.port)
    holder.server = uvicorn.Server(uvicorn_config(app, settings, h11_only=h11_only, log_level="warning"))
    holder.thread = threading.Thread(target=holder.server.run, daemon=True)
    server = holder.start()
    try:
        r = httpx.get(server.url + "/ping", timeout=10.0)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == "ServiceUnavailable"
    finally:
        server.stop()
