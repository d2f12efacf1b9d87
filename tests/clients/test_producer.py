"""``RedisProducer`` through a real redis-server into a real ``foveate worker`` process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from clients import sdk
from clients.producer import RedisProducer
from tests.clients._servers import FoveateProcess, free_port, start_worker


@pytest.fixture
def worker(redis_server: str, tmp_path: Path) -> Iterator[FoveateProcess]:
    proc = start_worker(tmp_path, redis_server)
    yield proc
    proc.stop()


@pytest.fixture
def producer(redis_server: str) -> Iterator[RedisProducer]:
    with RedisProducer(redis_server) as p:
        yield p


def patches(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # (n, P, P, 3)


def test_producer_into_a_worker(worker: FoveateProcess, producer: RedisProducer, redis_server: str) -> None:
    # One worker process serves both checks: starting one costs seconds on the CI machine.
    assert producer.worker_alive()
    check_pipelined_streams_in_order(producer, redis_server)
    check_frames_and_a_rejected_fixation(producer)


def check_pipelined_streams_in_order(producer: RedisProducer, redis_server: str) -> None:
    a, b = patches(6, 0), patches(6, 1)
    items = []
    for i in range(6):  # interleaved, as two rigs would send them
        items.append(sdk.FixationItem("rig-a", patch=a[i], seq=i, t=i * 0.25, duration_ms=200, reset=i == 0))
        items.append(sdk.FixationItem("rig-b", patch=b[i], seq=i, reset=i in (0, 3), encoding="png"))
    ids = producer.send_many(items, return_prediction=True)
    assert len(set(ids)) == len(items)
    results = producer.results(ids, timeout=60)
    by_stream: dict[str, list[sdk.FixationResult]] = {"rig-a": [], "rig-b": []}
    for r in results:
        by_stream[r.stream_id].append(r)
    assert [r.seq for r in by_stream["rig-a"]] == list(range(6))
    assert [r.step for r in by_stream["rig-a"]] == [1, 2, 3, 4, 5, 6]
    assert [r.step for r in by_stream["rig-b"]] == [1, 2, 3, 1, 2, 3]  # the reset at seq 3
    for r in results:
        assert (r.error is None) == (r.step == 1)
        assert r.prediction is not None and r.prediction.shape == (16,)
    # Every result is also on the stream's results stream, which rigs can XREAD.
    client = redis.Redis.from_url(redis_server)
    try:
        entries: Any = client.xrange("foveate:results:rig-b")
    finally:
        client.close()
    assert [fields[b"step"] for _, fields in entries] == [b"1", b"2", b"3", b"1", b"2", b"3"]
    assert producer.backlog() == 0


def check_frames_and_a_rejected_fixation(producer: RedisProducer) -> None:
    frame = patches(1, 2)[0].repeat(4, axis=0).repeat(4, axis=1)  # (128, 128, 3)
    first = producer.result(
        producer.send("rig-c", frame=frame, x=64, y=40, size_px=40, reset=True), timeout=60
    )
    assert (first.stream_id, first.step, first.error) == ("rig-c", 1, None)
    second = producer.result(producer.send("rig-c", sdk.encode_image(frame[:40, :40], "jpeg")), timeout=60)
    assert second.step == 2 and second.error is not None
    bad = producer.send("rig-c", b"definitely not a PNG")
    with pytest.raises(sdk.PatchError, match="decode"):
        producer.result(bad, timeout=60)
    # The stream goes on after a rejected entry.
    assert producer.result(producer.send("rig-c", frame[:32, :32]), timeout=60).step == 3


def test_bad_input_is_refused_before_xadd(producer: RedisProducer, redis_server: str) -> None:
    with pytest.raises(sdk.InputError, match="stream_id"):
        producer.send("has space", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(sdk.InputError, match="exactly one image"):
        producer.send("rig-d")
    assert producer.backlog() == 0  # nothing was written
    assert redis.Redis.from_url(redis_server).exists("foveate:fixations") == 0


def test_timeouts_backlog_and_max_backlog_without_a_worker(
    producer: RedisProducer, redis_server: str
) -> None:
    assert not producer.worker_alive()
    rid = producer.send("rig-e", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(sdk.WorkerTimeout, match="is a worker running"):
        producer.result(rid, timeout=0.3)
    producer.send_many(
        [{"stream_id": "rig-e", "patch": np.zeros((8, 8, 3), np.uint8)}] * 2, want_results=False
    )
    assert producer.backlog() == 3
    with RedisProducer(redis_server, max_backlog=4) as capped:
        with pytest.raises(sdk.QueueFull, match="max_backlog"):
            capped.send_many([sdk.FixationItem("rig-e", patch=np.zeros((8, 8, 3), np.uint8))] * 2)
    assert producer.backlog() == 3


def test_unreachable_redis_is_a_connect_error() -> None:
    with RedisProducer(f"redis://127.0.0.1:{free_port()}/0") as p:
        with pytest.raises(sdk.ConnectError, match="cannot reach Redis"):
            p.send("rig-f", np.zeros((8, 8, 3), np.uint8))
