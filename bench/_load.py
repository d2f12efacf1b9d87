"""Load generators of the service benchmark: pre-encoded fixations sent over HTTP or XADDed to Redis.

Every stream behaves like a rig: it sends its next fixation when the previous result came back
(HTTP), or keeps at most ``window_size`` fixations in flight (Redis). Requests are encoded before
the clock starts, so that the client costs the machine as little CPU as possible: :class:`RawHttp`
writes pre-built HTTP/1.1 requests on keep-alive connections (:class:`HttpxPost` does the same
through httpx, to check that the raw client biases nothing), and :class:`Pipeliner` sends the
XADDs of all streams together, one pipeline per round trip.

A :class:`Window` counts the fixations answered inside the measured interval and their latencies.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import redis.asyncio as aioredis

RESULT_TIMEOUT_S = 120.0  # a result later than this means the server is stuck: fail loudly
Load = Callable[["Window"], Coroutine[Any, Any, None]]


@dataclass
class Payloads:
    """The patches pre-encoded for each transport; stream i sends patch ``(7 i + k) % len`` at step k."""

    patches: list[np.ndarray]
    json_bodies: list[bytes] = field(init=False)  # b'{"raw_b64":"...","shape":[P,P,3]}'
    raw: list[bytes] = field(init=False)
    shape: str = field(init=False)

    def __post_init__(self) -> None:
        self.json_bodies = [
            json.dumps({"raw_b64": base64.b64encode(p.tobytes()).decode(), "shape": list(p.shape)}).encode()
            for p in self.patches
        ]
        self.raw = [p.tobytes() for p in self.patches]
        self.shape = ",".join(str(n) for n in self.patches[0].shape)

    def index(self, stream: int, step: int) -> int:
        return (7 * stream + step) % len(self.patches)


@dataclass
class Window:
    """Counts fixations answered between ``start`` and ``end`` (perf_counter) and their latencies."""

    start: float
    end: float
    latencies: list[float] = field(default_factory=list)

    def record(self, sent: float, done: float, count: int = 1) -> None:
        if self.start <= done <= self.end:
            self.latencies.extend([done - sent] * count)

    def open(self) -> bool:
        return time.perf_counter() < self.end


# ---------------------------------------------------------------- HTTP load


class RawHttp:
    """One keep-alive HTTP/1.1 connection with pre-encoded requests: costs the client almost no CPU."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json"
            f"\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.writelines((head, body))
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").lower().split("\r\n")
        length = next((int(h.split(":", 1)[1]) for h in lines if h.startswith("content-length:")), None)
        if length is None:
            raise RuntimeError(f"the server answered {path} without content-length: {lines[:4]}")
        data = await self.reader.readexactly(length)
        if lines[0][9:12] != "200":
            raise RuntimeError(f"POST {path} answered {lines[0]}: {data[:300]!r}")
        return data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class HttpxPost:
    """The same ``post`` through ``httpx.AsyncClient`` (to check that the raw client biases nothing)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def post(self, path: str, body: bytes) -> bytes:
        resp = await self.client.post(path, content=body, headers={"content-type": "application/json"})
        if resp.status_code != 200:
            raise RuntimeError(f"POST {path} answered {resp.status_code}: {resp.text[:300]}")
        return resp.content

    async def close(self) -> None:
        return None


def http_load(
    url: str, payloads: Payloads, streams: int, tag: str, *, client: str, batch_streams: int | None
) -> Load:
    """A load of ``streams`` synchronous streams; each request group waits for its answer, then sends."""
    host, port = url.removeprefix("http://").split(":")
    ids = [f"{tag}-{i}" for i in range(streams)]
    size = batch_streams or 1
    groups = [list(range(i, min(i + size, streams))) for i in range(0, streams, size)]

    async def loop(conn: RawHttp | HttpxPost, group: list[int], window: Window) -> None:
        step = 0
        while window.open():
            if batch_streams is None:
                i = group[0]
                path, body = f"/v1/streams/{ids[i]}/fixations", payloads.json_bodies[payloads.index(i, step)]
            else:
                items = [
                    b'{"stream_id":"%s",' % ids[i].encode()
                    + payloads.json_bodies[payloads.index(i, step)][1:]
                    for i in group
                ]
                path, body = "/v1/fixations/batch", b'{"fixations":[' + b",".join(items) + b"]}"
            sent = time.perf_counter()
            data = await conn.post(path, body)
            if batch_streams is not None and b'"ok":false' in data:
                raise RuntimeError(f"the batch endpoint rejected a fixation: {data[:300]!r}")
            window.record(sent, time.perf_counter(), len(group))
            step += 1

    async def run(window: Window) -> None:
        if client == "raw":
            conns: list[RawHttp | HttpxPost] = [RawHttp(host, int(port)) for _ in groups]
            await asyncio.gather(*(loop(c, g, window) for c, g in zip(conns, groups, strict=True)))
            for c in conns:
                await c.close()
            return
        limits = httpx.Limits(max_connections=len(groups), max_keepalive_connections=len(groups))
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=RESULT_TIMEOUT_S) as hc:
            await asyncio.gather(*(loop(HttpxPost(hc), g, window) for g in groups))

    return run


# ---------------------------------------------------------------- Redis load


class Pipeliner:
    """XADDs from many coroutines sent together: one pipeline per round trip, one connection."""

    def __init__(self, client: aioredis.Redis, stream: str) -> None:
        self.client, self.stream = client, stream
        self.pending: list[tuple[dict[str, Any], asyncio.Future[str]]] = []
        self.wake = asyncio.Event()

    def xadd(self, fields: dict[str, Any]) -> asyncio.Future[str]:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.pending.append((fields, fut))
        self.wake.set()
        return fut

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.pending = self.pending, []
            pipe = self.client.pipeline(transaction=False)
            for fields, _ in batch:
                pipe.xadd(self.stream, fields, maxlen=100_000, approximate=True)
            for (_, fut), entry in zip(batch, await pipe.execute(), strict=True):
                fut.set_result(entry.decode())


class Results:
    """Reads ``foveate:results`` and wakes whoever waits for an entry id (results may come first)."""

    def __init__(self, client: aioredis.Redis, stream: str) -> None:
        self.client, self.stream = client, stream
        self.early: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Future[float]] = {}

    async def run(self, last: str) -> None:
        while True:
            resp = await self.client.xread({self.stream: last}, count=1000, block=200)
            now = time.perf_counter()
            for _name, entries in resp or []:
                for eid, fields in entries:
                    last = eid.decode()
                    self._done(fields, now)

    def _done(self, fields: dict[bytes, bytes], now: float) -> None:
        key = fields.get(b"entry_id", b"").decode()
        fut = self.waiters.pop(key, None)
        if fields.get(b"ok") != b"1":
            problem = RuntimeError(
                f"the worker rejected {key}: {fields.get(b'rejected')!r} {fields.get(b'detail')!r}"
            )
            if fut is not None:
                fut.set_exception(problem)
                return
            raise problem
        if fut is not None:
            fut.set_result(now)
        else:
            self.early[key] = now

    async def wait(self, entry: str) -> float:
        if entry in self.early:
            return self.early.pop(entry)
        fut = self.waiters[entry] = asyncio.get_running_loop().create_future()
        return await asyncio.wait_for(fut, RESULT_TIMEOUT_S)


def redis_load(
    url: str,
    payloads: Payloads,
    streams: int,
    tag: str,
    *,
    window_size: int,
    input_stream: str,
    results_stream: str,
) -> Load:
    """``streams`` streams, each with at most ``window_size`` fixations in flight (1: like a rig)."""
    ids = [f"{tag}-{i}" for i in range(streams)]

    async def stream(i: int, sender: Pipeliner, results: Results, window: Window) -> None:
        inflight: list[tuple[float, asyncio.Future[str]]] = []
        step = 0
        while window.open() or inflight:
            while window.open() and len(inflight) < window_size:
                fields = {
                    "stream_id": ids[i],
                    "raw": payloads.raw[payloads.index(i, step)],
                    "shape": payloads.shape,
                }
                inflight.append((time.perf_counter(), sender.xadd(fields)))
                step += 1
            sent, fut = inflight.pop(0)
            window.record(sent, await results.wait(await fut))

    async def run(window: Window) -> None:
        send, read = aioredis.Redis.from_url(url), aioredis.Redis.from_url(url)
        try:
            last = await read.xrevrange(results_stream, count=1)
            sender, results = Pipeliner(send, input_stream), Results(read, results_stream)
            helpers = [
                asyncio.create_task(sender.run()),
                asyncio.create_task(results.run(last[0][0].decode() if last else "0-0")),
            ]
            work = asyncio.gather(*(stream(i, sender, results, window) for i in range(streams)))
            done, _ = await asyncio.wait([work, *helpers], return_when=asyncio.FIRST_COMPLETED)
            for task in helpers:
                task.cancel()
            await next(iter(done))  # the streams' end, or why a helper failed
        finally:
            await send.aclose()
            await read.aclose()

    return run
