"""Brokers: the in-process queue, and Redis Streams against a real redis-server."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
import pytest
import redis

from service.broker import LocalBroker
from service.errors import QueueFull, WorkerTimeout, WorkerUnavailable
from service.messages import Control, Fixation
from service.redis_broker import RedisBroker
from service.streams import entry_key
from tests.service._support import free_port, small_settings


def _fix(stream: str = "s1", seq: int = 0) -> Fixation:
    return Fixation(stream, seq=seq, patch=np.full((4, 4, 3), seq, np.uint8))


def _decode_into(fix: Fixation) -> None:
    """A stand-in decoder that marks what it saw (the worker's real one is tested in test_worker)."""
    assert fix.source is not None
    fix.patch = np.frombuffer(fix.source.data, np.uint8).reshape(fix.source.shape or (0,))
    fix.source = None


def _get(broker: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = broker.get(0.2)
        if msg is not None:
            return msg
    raise AssertionError("nothing received")


# ------------------------------------------------------------------ LocalBroker


def test_local_reply_reaches_the_waiting_request() -> None:
    broker = LocalBroker(small_settings())
    broker.start_worker(_decode_into)

    async def scenario() -> dict[str, Any]:
        await broker.start_api()
        fix = _fix()
        await broker.submit([fix], wait=True)
        got = await asyncio.to_thread(_get, broker)
        assert got is fix and fix.entry_id == "local-1"
        broker.reply([(got, {"ok": True, "step": 1})])
        assert fix.request_id is not None
        return await broker.result(fix.request_id, 5.0)

    assert asyncio.run(scenario()) == {"ok": True, "step": 1}


def test_local_queue_full_queues_nothing() -> None:
    broker = LocalBroker(small_settings(max_queue=2))

    async def scenario() -> None:
        with pytest.raises(QueueFull, match="limit 2"):
            await broker.submit([_fix(seq=i) for i in range(3)], wait=False)
        assert broker.backlog() == 0
        await broker.submit([_fix(seq=i) for i in range(2)], wait=False)
        assert broker.backlog() == 2

    asyncio.run(scenario())


def test_local_timeout_and_liveness() -> None:
    broker = LocalBroker(small_settings())

    async def scenario() -> None:
        assert (await broker.worker_alive())[0] is False
        broker.start_worker(_decode_into)
        assert (await broker.worker_alive())[0] is True
        fix = _fix()
        await broker.submit([fix], wait=True)
        assert fix.request_id is not None
        with pytest.raises(WorkerTimeout, match="did not answer"):
            await broker.result(fix.request_id, 0.05)

    asyncio.run(scenario())


# ------------------------------------------------------------------ RedisBroker


def _redis_settings(url: str, **changes: Any) -> Any:
    return small_settings(redis_url=url, **changes)


def test_redis_round_trip(redis_server: str) -> None:
    settings = _redis_settings(redis_server)
    worker_side, api_side = RedisBroker(settings), RedisBroker(settings)
    worker_side.start_worker(_decode_into)
    worker_side.heartbeat({})
    r = redis.Redis.from_url(redis_server)
    try:

        async def scenario() -> dict[str, Any]:
            fix = _fix(seq=7)
            await api_side.submit([fix], wait=True)
            got = await asyncio.to_thread(_get, worker_side)
            assert isinstance(got, Fixation) and (got.stream_id, got.seq) == ("s1", 7)
            np.testing.assert_array_equal(got.patch, fix.patch)
            assert got.entry_id == fix.entry_id
            assert r.xpending(settings.input_stream, settings.consumer_group)["pending"] == 1
            worker_side.reply([(got, {"ok": True, "step": 1, "error": None, "updates_applied": 0})])
            assert fix.request_id is not None
            out = await api_side.result(fix.request_id, 5.0)
            await api_side.close_api()
            return out

        assert asyncio.run(scenario())["step"] == 1
        assert r.xpending(settings.input_stream, settings.consumer_group)["pending"] == 0  # acked
        (entry,) = r.xrange("foveate:results:s1")
        assert entry[1][b"step"] == b"1" and entry[1][b"error"] == b"nan" and entry[1][b"seq"] == b"7"
        assert r.xlen(settings.results_stream) == 1
    finally:
        worker_side.stop_worker()


def test_redis_results_carry_the_repeat_baseline(redis_server: str) -> None:
    settings = _redis_settings(redis_server)
    worker_side, api_side = RedisBroker(settings), RedisBroker(settings)
    worker_side.start_worker(_decode_into)
    worker_side.heartbeat({})
    r = redis.Redis.from_url(redis_server)
    scored = {"ok": True, "stream_id": "s1", "step": 2, "error": 0.1 + 0.2, "repeat_error": 0.4,
              "skill": 1 - (0.1 + 0.2) / 0.4, "skipped": True, "running_error": 0.3,
              "updates_applied": 5}  # fmt: skip
    try:

        async def scenario() -> dict[str, Any]:
            fix = _fix(seq=8)
            await api_side.submit([fix], wait=True)
            got = await asyncio.to_thread(_get, worker_side)
            worker_side.reply([(got, {**scored, "request_id": fix.request_id})])
            assert fix.request_id is not None
            out = await api_side.result(fix.request_id, 5.0)
            await api_side.close_api()
            return out

        reply = asyncio.run(scenario())
        assert {k: reply[k] for k in ("error", "repeat_error", "skill", "skipped")} == {
            k: scored[k] for k in ("error", "repeat_error", "skill", "skipped")
        }
        (entry,) = r.xrange("foveate:results:s1")
        fields = entry[1]
        # numbers as repr(): they read back exactly
        assert float(fields[b"error"]) == scored["error"] and float(fields[b"repeat_error"]) == 0.4
        assert float(fields[b"skill"]) == scored["skill"] and fields[b"skipped"] == b"1"
    finally:
        worker_side.stop_worker()


def test_redis_result_fields_of_an_unscored_fixation() -> None:
    from service.redis_broker import result_fields

    payload = {"ok": True, "step": 1, "error": None, "repeat_error": None, "skill": None, "skipped": False,
               "running_error": None, "updates_applied": 0}  # fmt: skip
    fields = result_fields(Fixation("s1", seq=0), payload)
    assert {k: fields[k] for k in ("error", "repeat_error", "skill", "skipped")} == {
        "error": "nan", "repeat_error": "nan", "skill": "nan", "skipped": "0"
    }  # fmt: skip
    rejected = result_fields(Fixation("s1"), {"ok": False, "error": "PatchError", "detail": "bad"})
    assert "repeat_error" not in rejected and rejected["rejected"] == "PatchError"


def test_redis_control_and_expired_commands(redis_server: str) -> None:
    settings = _redis_settings(redis_server)
    worker_side, api_side = RedisBroker(settings), RedisBroker(settings)
    worker_side.start_worker(_decode_into)
    r = redis.Redis.from_url(redis_server)
    try:
        # A command whose caller gave up long ago is dropped (and acknowledged).
        r.xadd(settings.control_stream, {"command": "reset", "args": "{}", "deadline": str(time.time() - 60)})

        async def scenario() -> dict[str, Any]:
            task = asyncio.create_task(api_side.command(Control("ping"), 5.0))
            got = await asyncio.to_thread(_get, worker_side)
            assert isinstance(got, Control) and got.command == "ping"
            worker_side.reply([(got, {"ok": True, "pong": 1})])
            out = await task
            await api_side.close_api()
            return out

        assert asyncio.run(scenario()) == {"ok": True, "pong": 1}
        assert worker_side.get(0.3) is None
        assert r.xpending(settings.control_stream, settings.consumer_group)["pending"] == 0
    finally:
        worker_side.stop_worker()


def test_redis_bad_rig_message_is_delivered_with_its_problem(redis_server: str) -> None:
    settings = _redis_settings(redis_server)
    worker_side = RedisBroker(settings)
    worker_side.start_worker(_decode_into)
    try:
        r = redis.Redis.from_url(redis_server)
        r.xadd(settings.input_stream, {"stream_id": "rig", "raw": b"xx", "request_id": "q1"})
        got = _get(worker_side)
        assert isinstance(got, Fixation) and got.request_id == "q1"
        assert got.problem is not None and "shape" in str(got.problem)
    finally:
        worker_side.stop_worker()


def _entry(r: redis.Redis, settings: Any, seq: int) -> str:
    fields = {"stream_id": "s", "seq": seq, "raw": bytes([seq]) * 12, "shape": "2,2,3"}
    return str(r.xadd(settings.input_stream, fields).decode())  # type: ignore[arg-type]


def test_redis_rereads_everything_after_the_checkpoint_whoever_read_it(redis_server: str) -> None:
    # A claim would wait a minute: the entries come at once, because the offset says what to re-read.
    settings = _redis_settings(redis_server, claim_idle_ms=60_000, consumer_name="new-name")
    r = redis.Redis.from_url(redis_server)
    r.xgroup_create(settings.input_stream, settings.consumer_group, id="0", mkstream=True)
    ids = [_entry(r, settings, seq) for seq in range(5)]
    # A dead worker read all five, applied and acknowledged 0-2 (its checkpoint holds 0 and 1 only),
    # and died with 3 and 4 pending.
    r.xreadgroup(settings.consumer_group, "dead", {settings.input_stream: ">"}, count=10)
    r.xack(settings.input_stream, settings.consumer_group, *ids[:3])
    survivor = RedisBroker(settings)
    assert survivor.start_worker(_decode_into, after=ids[1]) == ids[1]
    try:
        got = [_get(survivor) for _ in range(3)]
        assert [(g.seq, g.entry_id) for g in got] == [(2, ids[2]), (3, ids[3]), (4, ids[4])]
        survivor.reply([(g, {"ok": False, "error": "InputError", "detail": "test"}) for g in got])
        assert r.xpending(settings.input_stream, settings.consumer_group)["pending"] == 0
        assert survivor.get(0.3) is None  # each once
        new = _entry(r, settings, 5)  # then new entries
        assert _get(survivor).entry_id == new
    finally:
        survivor.stop_worker()


def test_redis_without_checkpoint_rereads_from_the_oldest_pending_entry(redis_server: str) -> None:
    settings = _redis_settings(redis_server, claim_idle_ms=60_000)
    r = redis.Redis.from_url(redis_server)
    r.xgroup_create(settings.input_stream, settings.consumer_group, id="0", mkstream=True)
    ids = [_entry(r, settings, seq) for seq in range(3)]
    r.xreadgroup(settings.consumer_group, "dead", {settings.input_stream: ">"}, count=10)
    r.xack(settings.input_stream, settings.consumer_group, ids[0])
    survivor = RedisBroker(settings)
    start = survivor.start_worker(_decode_into)
    try:
        # everything before the oldest pending entry was answered
        assert entry_key(ids[0]) <= entry_key(start) < entry_key(ids[1])  # type: ignore[operator]
        assert [_get(survivor).seq for _ in range(2)] == [1, 2]
    finally:
        survivor.stop_worker()


def test_redis_worker_under_its_old_name_reads_its_pending_entry_once(redis_server: str) -> None:
    # Reading its own history with XREADGROUP 0 until nothing was pending re-read the one entry in
    # flight about a hundred times a second (each read counts a delivery).
    settings = _redis_settings(redis_server, consumer_name="w1")
    r = redis.Redis.from_url(redis_server)
    r.xgroup_create(settings.input_stream, settings.consumer_group, id="0", mkstream=True)
    eid = _entry(r, settings, 4)
    r.xreadgroup(settings.consumer_group, "w1", {settings.input_stream: ">"}, count=10)  # read, then "crash"
    again = RedisBroker(settings)  # the same consumer name comes back (a restarted container)
    again.start_worker(_decode_into)
    try:
        got = _get(again)
        assert isinstance(got, Fixation) and got.seq == 4
        assert again.get(0.5) is None
        (pending,) = r.xpending_range(settings.input_stream, settings.consumer_group, "-", "+", 10)
        assert pending["message_id"].decode() == eid and pending["times_delivered"] == 1
    finally:
        again.stop_worker()


def test_redis_claims_stale_entries_before_the_offset(redis_server: str) -> None:
    # An entry the checkpoint holds whose acknowledgement failed stays pending: it is claimed once
    # idle and delivered again (the worker answers it as a duplicate), so the backlog does not keep it.
    settings = _redis_settings(redis_server, claim_idle_ms=200, consumer_name="survivor")
    r = redis.Redis.from_url(redis_server)
    r.xgroup_create(settings.input_stream, settings.consumer_group, id="0", mkstream=True)
    eid = _entry(r, settings, 1)
    r.xreadgroup(settings.consumer_group, "dead", {settings.input_stream: ">"}, count=10)
    time.sleep(0.3)
    survivor = RedisBroker(settings)
    survivor.start_worker(_decode_into, after=eid)
    try:
        got = _get(survivor)
        assert isinstance(got, Fixation) and got.seq == 1
        owners = r.xpending_range(settings.input_stream, settings.consumer_group, "-", "+", 10)
        assert [o["consumer"] for o in owners] == [b"survivor"]
    finally:
        survivor.stop_worker()


def test_redis_backpressure_and_liveness(redis_server: str) -> None:
    settings = _redis_settings(redis_server, max_queue=3)
    api_side = RedisBroker(settings)
    r = redis.Redis.from_url(redis_server)

    async def scenario() -> None:
        alive, why = await api_side.worker_alive()
        assert not alive and "heartbeat" in why
        with pytest.raises(WorkerUnavailable, match="no live worker"):
            await api_side.submit([_fix()], wait=True)
        await api_side.submit([_fix(seq=i) for i in range(3)], wait=False)
        await asyncio.sleep(0.3)  # past the backlog cache
        with pytest.raises(QueueFull, match="limit 3"):
            await api_side.submit([_fix(seq=9)], wait=False)
        r.set(settings.heartbeat_key, json.dumps({"ts": time.time()}))
        await asyncio.sleep(0.3)
        assert (await api_side.worker_alive())[0]
        await api_side.close_api()

    asyncio.run(scenario())
    assert r.xlen(settings.input_stream) == 3


def test_redis_down_is_503() -> None:
    api_side = RedisBroker(small_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))

    async def scenario() -> None:
        with pytest.raises(WorkerUnavailable, match="cannot reach Redis"):
            await api_side.submit([_fix()], wait=False)
        assert (await api_side.worker_alive())[0] is False
        await api_side.close_api()

    asyncio.run(scenario())
