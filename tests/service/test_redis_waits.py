"""The Redis API side waits for many results at once without running out of Redis connections.

A soak (bench/soak.py --redis: 64 rigs posting batches, wait=true) found 58 % of the fixations
answered 503 "cannot reach Redis (MaxConnectionsError)": every waiting fixation held a connection of
redis-py's pool (100 by default) for its BLPOP, so a few batches in flight ran the pool dry while
Redis was fine. Against a real redis-server: many single requests wait at once, and a batch larger
than the whole pool waits on one connection.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import redis

from service.errors import WorkerTimeout
from service.messages import Control
from service.redis_api import SPARE_CONNECTIONS
from service.redis_broker import RedisBroker
from tests.service._support import small_settings


def _reply(r: redis.Redis, settings: Any, request_id: str, step: int) -> None:
    """What the worker does for an answered fixation (service/redis_worker.py): RPUSH to its key."""
    r.rpush(settings.result_key_prefix + request_id, json.dumps({"ok": True, "step": step}))


async def _until_blocked(r: redis.Redis, count: int, tasks: list[asyncio.Task[Any]]) -> None:
    """Wait until ``count`` clients block in Redis (or a waiter already failed: the test then fails)."""
    deadline = time.monotonic() + 60.0  # only a guard against hanging: the condition decides
    while (await asyncio.to_thread(r.info, "clients"))["blocked_clients"] < count:
        if any(t.done() for t in tasks):
            return
        assert time.monotonic() < deadline, "the waiters never blocked in Redis"
        await asyncio.sleep(0.01)


def test_more_single_requests_wait_than_redis_pys_default_pool(redis_server: str) -> None:
    settings = small_settings(redis_url=redis_server)  # max_connections 1000 HTTP requests at once
    api_side, r = RedisBroker(settings), redis.Redis.from_url(redis_server)
    ids = [f"single-{i:03d}" for i in range(150)]

    async def scenario() -> list[dict[str, Any]]:
        tasks = [asyncio.create_task(api_side.result(rid, 60.0)) for rid in ids]
        await _until_blocked(r, len(ids), tasks)
        for step, rid in enumerate(ids):
            _reply(r, settings, rid, step)
        try:
            return await asyncio.gather(*tasks)
        finally:
            await api_side.close_api()

    out = asyncio.run(scenario())
    assert [p["step"] for p in out] == list(range(150))


def test_a_batch_larger_than_the_pool_waits_on_one_connection(redis_server: str) -> None:
    settings = small_settings(redis_url=redis_server, max_connections=8)  # a pool of 8 + spare
    api_side, r = RedisBroker(settings), redis.Redis.from_url(redis_server)
    ids = [f"batch-{i:03d}" for i in range(120)]

    async def scenario() -> list[Any]:
        task = asyncio.create_task(api_side.results(ids, 60.0))
        await _until_blocked(r, 1, [task])
        for step, rid in reversed(list(enumerate(ids))):  # answered in any order
            _reply(r, settings, rid, step)
        try:
            return await task
        finally:
            await api_side.close_api()

    out = asyncio.run(scenario())
    assert [p["step"] for p in out] == list(range(120))  # in request order


def test_an_unanswered_item_of_a_batch_times_out_alone(redis_server: str) -> None:
    settings = small_settings(redis_url=redis_server)
    api_side, r = RedisBroker(settings), redis.Redis.from_url(redis_server)
    _reply(r, settings, "answered", 5)

    async def scenario() -> list[Any]:
        try:
            return await api_side.results(["answered", "never"], 0.5)
        finally:
            await api_side.close_api()

    answered, never = asyncio.run(scenario())
    assert answered == {"ok": True, "step": 5}
    assert isinstance(never, WorkerTimeout) and "never" in str(never)


def test_listing_the_streams_of_three_ranks_holds_one_connection_per_request(redis_server: str) -> None:
    # GET /v1/streams with FOVEATE_SHARDS=3 asks every rank; as many lists at once as the whole pool
    # (4 HTTP requests' worth + the spare) must all be answered, each request waiting on one connection
    settings = small_settings(redis_url=redis_server, shards=3, max_connections=4)
    requests = settings.max_connections + SPARE_CONNECTIONS
    api_side, r = RedisBroker(settings), redis.Redis.from_url(redis_server)

    async def scenario() -> list[dict[str, Any]]:
        tasks = [
            asyncio.create_task(api_side.command(Control("streams", {"prefix": ""}), 60.0))
            for _ in range(requests)
        ]
        await _until_blocked(r, requests, tasks)
        for rank in range(3):  # each rank answers its control shard, as a worker does: RPUSH the reply
            for _, fields in r.xrange(f"foveate:control:{rank}"):
                listed = {"ok": True, "streams": [{"stream_id": f"on-rank-{rank}"}], "count": 1}
                r.rpush(settings.result_key_prefix + fields[b"request_id"].decode(), json.dumps(listed))
        try:
            return await asyncio.gather(*tasks)
        finally:
            await api_side.close_api()

    out = asyncio.run(scenario())
    assert len(out) == requests
    for joined in out:
        assert sorted(s["stream_id"] for s in joined["streams"]) == ["on-rank-0", "on-rank-1", "on-rank-2"]
        assert joined["count"] == 3
