"""The API's half of ``RedisBroker`` (service/redis_broker.py has the keys): submit fixations (``XADD``
to the input stream, refused when the backlog is over ``max_queue`` or could not be served within
``sync_timeout_s``), send commands (``XADD`` to the control stream, signed when a secret is set),
wait for a reply (``BLPOP`` on its result key), and read the worker's heartbeat. It runs in the
API's event loop, on an asyncio connection; its readings of Redis are cached for ``_CACHE_S``.

With ``shards`` > 1 (``FOVEATE_SHARDS``: the ranks of ``foveate worker --distributed``) every stream
belongs to one rank, ``rank_of(stream_id, shards)`` (service/shards.py): its fixations go to that
rank's input stream ``shard_key(input_stream, rank)`` and its commands (stream, prediction, reset,
delete) to that rank's control stream; commands about the model (``model``, ``checkpoint``) go to
rank 0, and the list of streams is asked of every rank and joined. The backlog is the sum over the
shards, and the workers are alive when every rank's heartbeat is.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from learner.errors import FoveateError
from service.backpressure import queue_full_retry_after, refuse_late
from service.broker import new_request_id
from service.config import Settings
from service.errors import QueueFull, WorkerTimeout, WorkerUnavailable
from service.messages import Control, Fixation, control_to_fields, fixation_to_fields, sign_control
from service.redis_common import RedisSide, id_text
from service.shards import rank_of, shard_key

_CACHE_S = 0.25  # how long the API trusts a backlog or heartbeat reading
#: Redis connections beyond one per HTTP request at once (``max_connections``): the backlog and
#: heartbeat readings and the commands' XADDs, made while every request waits in a BLPOP.
SPARE_CONNECTIONS = 32


class RedisApiSide(RedisSide):
    """Submits fixations and commands to Redis and waits for their replies (see the module docstring)."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._aio: aioredis.Redis | None = None
        # unread + pending entries, for admission (the worker side keeps a reading of its own)
        self._api_backlog_cache = (0.0, 0)
        self._alive_cache: tuple[float, bool, str] = (0.0, False, "")
        self._load: tuple[int, float | None] = (0, None)  # the last heartbeat's backlog and rate
        self._tick_s: float | None = None  # the slowest rank's mean tick time (they tick in lockstep)

    def _unavailable(self, exc: Exception) -> WorkerUnavailable:
        # The answer names neither the URL nor the server's message (either may carry a password or
        # an address); the log has the address without credentials.
        self._log_error("Redis is unreachable", exc)
        return WorkerUnavailable(
            f"cannot reach Redis ({type(exc).__name__}); check FOVEATE_REDIS_URL and the Redis server"
        )

    @property
    def aio(self) -> aioredis.Redis:
        if self._aio is None:
            # no read timeout: BLPOP waits up to the request's own timeout, which may exceed
            # redis-py's default of 5 s (a read timeout would answer those long waits with 503).
            # A request waits on one connection at a time (a batch too: results()), so the pool
            # holds one per HTTP request uvicorn admits; redis-py's default of 100 answered 503
            # "cannot reach Redis" once 100 fixations waited at once.
            self._aio = aioredis.Redis.from_url(
                self.url,
                socket_connect_timeout=2.0,
                socket_timeout=None,
                max_connections=self.settings.max_connections + SPARE_CONNECTIONS,
            )
        return self._aio

    async def close_api(self) -> None:
        if self._aio is not None:
            await self._aio.aclose()
            self._aio = None

    # --- where a message goes (shards) -----------------------------------------------------------
    def _shard(self, key: str, rank: int) -> str:
        """``key`` itself with one shard (the single worker's names), else rank ``rank``'s shard of it."""
        return key if self.settings.shards == 1 else shard_key(key, rank)

    def rank_of(self, stream_id: str) -> int:
        """The worker rank that holds ``stream_id``."""
        return rank_of(stream_id, self.settings.shards)

    def _control_rank(self, control: Control) -> int:
        stream_id = control.args.get("stream_id")
        return 0 if stream_id is None else self.rank_of(str(stream_id))

    async def _backlog_async(self) -> int:
        now = time.monotonic()
        if now - self._api_backlog_cache[0] < _CACHE_S:
            return self._api_backlog_cache[1]
        value = 0
        for rank in range(self.settings.shards):
            stream = self._shard(self.settings.input_stream, rank)
            try:
                groups = await self.aio.xinfo_groups(stream)
            except ResponseError:  # no stream yet
                groups = []
            count = self._count_backlog(groups, unread_only=False)
            value += int(await self.aio.xlen(stream)) if count is None else count  # no group: none read
        self._api_backlog_cache = (now, value)
        return value

    async def submit(self, fixations: Sequence[Fixation], *, wait: bool) -> None:
        try:
            if wait:
                alive, why = await self.worker_alive()
                if not alive:
                    raise WorkerUnavailable(
                        f"no live worker: {why}; start `foveate worker` or send with wait=false"
                    )
            backlog = await self._backlog_async()
            if backlog + len(fixations) > self.settings.max_queue:
                await self.worker_alive()  # refreshes the heartbeat's service rate
                raise QueueFull(
                    f"{backlog} fixations are waiting in {self.settings.input_stream} "
                    f"(limit {self.settings.max_queue}); retry later",
                    retry_after=queue_full_retry_after(
                        backlog + len(fixations) - self.settings.max_queue, self._load[1]
                    ),
                )
            timeout = self.settings.sync_timeout_s
            if wait:  # (worker_alive above has just read the heartbeat's rate and tick time)
                refuse_late(fixations, backlog, self._load[1], self._tick_s, timeout)
            pipe = self.aio.pipeline(transaction=False)
            for fix in fixations:
                fix.request_id = fix.request_id or new_request_id()
                stream = self._shard(self.settings.input_stream, self.rank_of(fix.stream_id))
                pipe.xadd(stream, fixation_to_fields(fix),  # type: ignore[arg-type]
                          maxlen=self.settings.stream_maxlen, approximate=True)  # fmt: skip
            ids = await pipe.execute()
        except RedisError as exc:
            raise self._unavailable(exc) from exc
        for fix, entry in zip(fixations, ids, strict=True):
            fix.entry_id = id_text(entry)

    async def command(self, control: Control, timeout: float | None = None) -> dict[str, Any]:
        """Send a command to the rank it concerns; ``streams`` (the list) to every rank, joined.

        The list is asked of every rank in one pipelined round trip and its replies are awaited on one
        connection (:meth:`results`), as any other request: the pool holds one connection per HTTP
        request, so one that waited on a connection per rank would empty it ``FOVEATE_SHARDS`` times
        faster, and answer 503 "cannot reach Redis" while Redis is fine."""
        if control.command != "streams" or self.settings.shards == 1:
            return await super().command(control, timeout)
        wait = self.settings.sync_timeout_s if timeout is None else timeout
        asks = [
            (Control(control.command, dict(control.args), request_id=new_request_id()), rank)
            for rank in range(self.settings.shards)
        ]
        await self._send_controls(asks, wait)
        replies = await self.results([str(ctl.request_id) for ctl, _ in asks], wait)
        for reply in replies:
            if isinstance(reply, FoveateError):  # no answer from a rank (timeout), or Redis is gone
                raise reply
        failed = [r for r in replies if isinstance(r, dict) and not r.get("ok")]
        if failed:
            return failed[0]
        streams = [s for r in replies if isinstance(r, dict) for s in r["streams"]]
        return {"ok": True, "streams": streams, "count": len(streams)}

    async def command_rank(self, control: Control, rank: int, timeout: float | None = None) -> dict[str, Any]:
        """Send a command to worker rank ``rank`` (with one shard: the worker) and return its reply."""
        if not 0 <= rank < self.settings.shards:
            raise ValueError(f"rank {rank} is not in 0..{self.settings.shards - 1} (FOVEATE_SHARDS)")
        control.request_id = control.request_id or new_request_id()
        wait = self.settings.sync_timeout_s if timeout is None else timeout
        await self._send_control(control, wait, rank=rank)
        return await self.result(control.request_id, wait)

    async def _send_control(self, control: Control, timeout: float, *, rank: int | None = None) -> None:
        await self._send_controls([(control, self._control_rank(control) if rank is None else rank)], timeout)

    async def _send_controls(self, controls: Sequence[tuple[Control, int]], timeout: float) -> None:
        """XADD each command to its rank's control stream, in one pipelined round trip."""
        pipe = self.aio.pipeline(transaction=False)
        for control, rank in controls:
            fields = control_to_fields(control)
            fields["deadline"] = repr(time.time() + timeout)
            if self._secret is not None:
                sign_control(fields, self._secret)
            pipe.xadd(self._shard(self.settings.control_stream, rank), fields,  # type: ignore[arg-type]
                      maxlen=10_000, approximate=True)  # fmt: skip
        try:
            await pipe.execute()
        except RedisError as exc:
            raise self._unavailable(exc) from exc

    async def result(self, request_id: str, timeout: float) -> dict[str, Any]:
        key = self.settings.result_key_prefix + request_id
        try:
            item = await self.aio.blpop([key], timeout=max(timeout, 0.01))
        except RedisError as exc:
            raise self._unavailable(exc) from exc
        if item is None:
            raise WorkerTimeout(
                f"the worker did not answer within {timeout:g} s (request {request_id}); the fixation "
                f"stays queued and its result will be in {self.settings.results_stream}"
            )
        payload: dict[str, Any] = json.loads(item[1])
        return payload

    async def results(
        self, request_ids: Sequence[str], timeout: float
    ) -> list[dict[str, Any] | FoveateError]:
        """A batch's replies, waiting on one connection: BLPOP on every key still unanswered until
        all are in or ``timeout`` is up (a BLPOP an item held a connection each: a few batches of
        64 emptied the pool)."""
        prefix = self.settings.result_key_prefix
        waiting = {prefix + rid: i for i, rid in enumerate(request_ids)}
        out: list[dict[str, Any] | FoveateError | None] = [None] * len(request_ids)
        deadline = time.monotonic() + timeout
        problem: FoveateError | None = None
        try:
            while waiting and (left := deadline - time.monotonic()) > 0:
                item = await self.aio.blpop(list(waiting), timeout=max(left, 0.01))
                if item is None:
                    break
                key = item[0].decode() if isinstance(item[0], bytes) else item[0]
                out[waiting.pop(key)] = json.loads(item[1])
        except RedisError as exc:
            problem = self._unavailable(exc)
        for key, i in waiting.items():
            out[i] = problem or WorkerTimeout(
                f"the worker did not answer within {timeout:g} s (request {key[len(prefix) :]}); a "
                f"fixation stays queued and its result will be in {self.settings.results_stream}"
            )
        return out  # type: ignore[return-value]

    async def worker_alive(self) -> tuple[bool, str]:
        now = time.monotonic()
        stamp, alive, why = self._alive_cache
        if now - stamp < _CACHE_S:
            return alive, why
        keys = [self._shard(self.settings.heartbeat_key, r) for r in range(self.settings.shards)]
        try:
            beats = await self.aio.mget(keys)
        except RedisError as exc:
            self._log_error("reading the heartbeat failed", exc)
            alive, why = False, f"cannot reach Redis ({type(exc).__name__}); check FOVEATE_REDIS_URL"
        else:
            alive, why = self._read_heartbeats(keys, beats)
            if None in beats:
                why += await self._shards_hint()
        self._alive_cache = (now, alive, why)
        return alive, why

    async def _shards_hint(self) -> str:
        """When a heartbeat is missing: whether the workers that do beat are laid out for another
        ``FOVEATE_SHARDS`` (a distributed worker behind an API set for one, or the reverse)."""
        base = self.settings.heartbeat_key
        other = shard_key(base, 0) if self.settings.shards == 1 else base
        try:
            found = bool(await self.aio.exists(other))
        except RedisError:
            return ""
        if not found:
            return ""
        if self.settings.shards == 1:
            fix = "a distributed worker runs; set FOVEATE_SHARDS to its number of ranks"
        else:
            fix = "a single worker runs; set FOVEATE_SHARDS=1, or start the distributed one"
        return f" (but {other} is there: {fix})"

    def _read_heartbeats(self, keys: list[str], beats: list[Any]) -> tuple[bool, str]:
        """(alive, why) from every rank's heartbeat: alive when each is there and young enough (the
        ranks learn in lockstep: one dead rank stops them all). The load is summed over the ranks."""
        depth, rate, oldest, oldest_key = 0, 0.0, -math.inf, keys[0]
        tick_s: float | None = None
        for key, raw in zip(keys, beats, strict=True):
            if raw is None:
                return False, f"no worker heartbeat in {key}"
            info = json.loads(raw)
            age = time.time() - float(info.get("ts", 0.0))
            if age > oldest:
                oldest, oldest_key = age, key
            depth += int(info.get("queue_depth") or 0)
            if info.get("tick_s") is not None:
                tick_s = max(tick_s or 0.0, float(info["tick_s"]))
            value = info.get("service_rate")
            rate = math.nan if value is None else rate + float(value)
        self._load = (depth, None if math.isnan(rate) else rate)
        self._tick_s = tick_s
        where = "" if len(keys) == 1 else f" in {oldest_key}"
        return oldest <= self.settings.heartbeat_timeout_s, f"worker heartbeat{where} {oldest:.1f} s old"

    async def worker_load(self) -> tuple[int, float | None]:
        await self.worker_alive()
        return self._load
