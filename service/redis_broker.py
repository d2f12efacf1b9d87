"""``RedisBroker``: the API and the worker as separate processes, over Redis Streams.

Keys (names from :class:`~service.config.Settings`; the format is in docs/redis-format.md):

- ``foveate:fixations``: input stream, ``XADD … MAXLEN ~ stream_maxlen``; the API and rigs write it.
  Read by consumer group ``foveate-workers`` with ``XREADGROUP``; an entry is ``XACK``-ed only after
  its result is published. At start the worker first re-reads (``XRANGE``), in order, every entry
  after its checkpoint's input offset up to the group's last delivered id, whichever consumer read
  or acknowledged it: those were applied after the checkpoint (lost with the dead worker's memory)
  or never; the worker's per-stream seq and entry id tell them from those the checkpoint holds.
  Then it reads new entries. Entries left pending for ``claim_idle_ms`` outside that range (an
  acknowledgement that failed) are taken over with ``XAUTOCLAIM`` and answered as duplicates.
- ``foveate:control``: commands (reset, delete, checkpoint, queries), same group, read by a thread
  of its own into the front of the worker's inbox, so that no backlog of fixations delays them; a
  command past its ``deadline`` is acknowledged and dropped, since its caller has already timed out.
- ``foveate:results`` and ``foveate:results:<stream_id>``: every result, capped streams (rigs XREAD).
- ``foveate:result:<request_id>``: a list holding the JSON reply for one request; the API waits with
  ``BLPOP``; it expires after ``result_ttl_s``. A list (not pub/sub) keeps a reply that arrives
  before the API starts waiting, and lets a rig fetch its own reply the same way.
- ``foveate:worker:heartbeat``: JSON ``{"ts": unix time, "queue_depth", "service_rate", …}`` set
  each second; ``/readyz`` wants it younger than ``heartbeat_timeout_s`` and the backlog servable
  within ``sync_timeout_s`` (service/backpressure.py).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from service import metrics
from service.backpressure import queue_full_retry_after, refuse_waiting
from service.broker import Broker, Decoder, Inbox, Message, new_request_id
from service.config import Settings
from service.errors import QueueFull, WorkerTimeout, WorkerUnavailable
from service.messages import (
    Control,
    Fixation,
    control_from_fields,
    control_to_fields,
    fixation_from_fields,
    fixation_to_fields,
    sign_control,
    verify_control,
)
from service.streams import entry_before, entry_key, entry_text

logger = logging.getLogger(__name__)

_CONTROL_GRACE_S = 2.0  # clock skew allowed between API and worker hosts for command deadlines
_CACHE_S = 0.25  # how long the API trusts a backlog or heartbeat reading
_RESULTS_TTL_S = 24 * 3600  # per-stream result streams of idle streams disappear after a day


def _fields(raw: dict[Any, Any]) -> dict[str, bytes]:
    return {(k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)): v for k, v in raw.items()}


def redact_url(url: str) -> str:
    """Where a Redis URL points, without its scheme, user and password: what log lines may show.

    >>> redact_url("redis://foveate:s3cret@redis:6379/0")
    'redis:6379/0'
    """
    _, sep, rest = url.partition("://")
    return rest.rpartition("@")[2] if sep else "(the Redis of FOVEATE_REDIS_URL)"


def _id(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _deadline(fields: dict[str, bytes]) -> float:
    """A command's ``deadline`` (Unix time); none or unreadable means no deadline."""
    try:
        value = float(fields.get("deadline") or "inf")
    except ValueError:
        return math.inf
    return value if not math.isnan(value) else math.inf


def result_fields(fix: Fixation, payload: dict[str, Any]) -> dict[str, str]:
    """Flat fields of a result entry in ``foveate:results`` (see docs/redis-format.md)."""
    out = {"stream_id": fix.stream_id, "ok": "1" if payload.get("ok") else "0"}
    if fix.request_id:
        out["request_id"] = fix.request_id
    if fix.entry_id:
        out["entry_id"] = fix.entry_id
    if fix.seq is not None:
        out["seq"] = str(fix.seq)
    if payload.get("ok"):
        err = payload.get("error")
        out["status"] = str(payload.get("status", "applied"))
        out["step"] = "" if payload.get("step") is None else str(payload["step"])
        out["gap"] = str(payload.get("gap", 0))
        out["error"] = "nan" if err is None else repr(float(err))
        for name in ("repeat_error", "skill"):
            value = payload.get(name)
            out[name] = "nan" if value is None else repr(float(value))
        out["skipped"] = "1" if payload.get("skipped") else "0"
        out["running_error"] = (
            "nan" if payload.get("running_error") is None else repr(payload["running_error"])
        )
        out["updates_applied"] = str(payload["updates_applied"])
    else:
        out["rejected"] = str(payload.get("error"))
        out["detail"] = str(payload.get("detail", ""))[:500]
    return out


class RedisBroker(Broker):
    """Broker over Redis Streams (see the module docstring for the keys).

    Parameters
    ----------
    settings
        ``redis_url`` and the key names, limits and timeouts.
    decode_threads
        Threads that decode rigs' PNG/JPEG payloads while the worker ticks.
    """

    def __init__(self, settings: Settings, *, decode_threads: int = 2) -> None:
        if settings.redis_url is None:
            raise ValueError("RedisBroker needs settings.redis_url")
        self.settings = settings
        self.url: str = settings.redis_url
        self.safe_url = redact_url(self.url)  # what log lines may show: host, port and database
        secret = settings.control_secret
        self._secret = secret.get_secret_value().encode() if secret is not None else None
        self._seen_commands: dict[str, float] = {}  # request id -> deadline: a signed command runs once
        self._decode_threads = decode_threads
        self._aio: aioredis.Redis | None = None
        self._sync: redis.Redis | None = None
        self.inbox = Inbox(4 * settings.max_batch + 64)
        self._inflight: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._control_thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._decode: Decoder | None = None
        self._replay: tuple[str, str] | None = None  # (after, until): entries to re-read at start
        # the API's reading (unread + pending, for admission) and the worker's (unread, for its
        # gauge) are different numbers: `serve --redis` has both sides in one object, so two caches
        self._api_backlog_cache = (0.0, 0)
        self._backlog_cache = (0.0, 0)
        self._alive_cache: tuple[float, bool, str] = (0.0, False, "")
        self._load: tuple[int, float | None] = (0, None)  # the last heartbeat's backlog and rate
        self._last_error_log = 0.0

    def _unavailable(self, exc: Exception) -> WorkerUnavailable:
        # The answer names neither the URL nor the server's message (either may carry a password or
        # an address); the log has the address without credentials.
        self._log_error("Redis is unreachable", exc)
        return WorkerUnavailable(
            f"cannot reach Redis ({type(exc).__name__}); check FOVEATE_REDIS_URL and the Redis server"
        )

    # ------------------------------------------------------------------ API side

    @property
    def aio(self) -> aioredis.Redis:
        if self._aio is None:
            # no read timeout: BLPOP waits up to the request's own timeout, which may exceed
            # redis-py's default of 5 s (a read timeout would answer those long waits with 503)
            self._aio = aioredis.Redis.from_url(self.url, socket_connect_timeout=2.0, socket_timeout=None)
        return self._aio

    async def close_api(self) -> None:
        if self._aio is not None:
            await self._aio.aclose()
            self._aio = None

    async def _backlog_async(self) -> int:
        now = time.monotonic()
        if now - self._api_backlog_cache[0] < _CACHE_S:
            return self._api_backlog_cache[1]
        try:
            groups = await self.aio.xinfo_groups(self.settings.input_stream)
        except ResponseError:  # no stream yet
            groups = []
        value = self._count_backlog(groups, unread_only=False)
        if value is None:
            value = int(await self.aio.xlen(self.settings.input_stream))  # no group yet: nothing read
        self._api_backlog_cache = (now, value)
        return value

    def _count_backlog(self, groups: list[dict[Any, Any]], *, unread_only: bool) -> int | None:
        for group in groups:
            info = _fields(group)
            name = info.get("name")
            if (name.decode() if isinstance(name, bytes) else name) != self.settings.consumer_group:
                continue
            lag = info.get("lag")
            unread = int(lag) if lag is not None else 0
            return unread if unread_only else unread + int(info.get("pending") or 0)
        return None

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
            late = refuse_waiting(backlog, len(fixations), self._load[1], timeout) if wait else None
            if late is not None:  # (wait: worker_alive above has just read the heartbeat's rate)
                raise QueueFull(
                    f"{backlog} fixations are waiting in {self.settings.input_stream}: the worker would "
                    f"not answer within FOVEATE_SYNC_TIMEOUT_S={timeout:g}; retry later, "
                    "or send with wait=false",
                    retry_after=late,
                )
            pipe = self.aio.pipeline(transaction=False)
            for fix in fixations:
                fix.request_id = fix.request_id or new_request_id()
                pipe.xadd(self.settings.input_stream, fixation_to_fields(fix),  # type: ignore[arg-type]
                          maxlen=self.settings.stream_maxlen, approximate=True)  # fmt: skip
            ids = await pipe.execute()
        except RedisError as exc:
            raise self._unavailable(exc) from exc
        for fix, entry in zip(fixations, ids, strict=True):
            fix.entry_id = _id(entry)

    async def _send_control(self, control: Control, timeout: float) -> None:
        fields = control_to_fields(control)
        fields["deadline"] = repr(time.time() + timeout)
        if self._secret is not None:
            sign_control(fields, self._secret)
        try:
            await self.aio.xadd(self.settings.control_stream, fields,  # type: ignore[arg-type]
                                maxlen=10_000, approximate=True)  # fmt: skip
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

    async def worker_alive(self) -> tuple[bool, str]:
        now = time.monotonic()
        stamp, alive, why = self._alive_cache
        if now - stamp < _CACHE_S:
            return alive, why
        try:
            raw = await self.aio.get(self.settings.heartbeat_key)
        except RedisError as exc:
            self._log_error("reading the heartbeat failed", exc)
            alive, why = False, f"cannot reach Redis ({type(exc).__name__}); check FOVEATE_REDIS_URL"
        else:
            if raw is None:
                alive, why = False, f"no worker heartbeat in {self.settings.heartbeat_key}"
            else:
                info = json.loads(raw)
                age = time.time() - float(info.get("ts", 0.0))
                alive = age <= self.settings.heartbeat_timeout_s
                why = f"worker heartbeat {age:.1f} s old"
                rate = info.get("service_rate")
                self._load = (int(info.get("queue_depth") or 0), None if rate is None else float(rate))
        self._alive_cache = (now, alive, why)
        return alive, why

    async def worker_load(self) -> tuple[int, float | None]:
        await self.worker_alive()
        return self._load

    # ------------------------------------------------------------------ worker side

    @property
    def sync(self) -> redis.Redis:
        if self._sync is None:
            self._sync = redis.Redis.from_url(self.url, socket_connect_timeout=2.0, socket_timeout=30.0)
        return self._sync

    def _ensure_group(self, stream: str, start: str) -> None:
        try:
            self.sync.xgroup_create(stream, self.settings.consumer_group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def start_worker(self, decode: Decoder, *, after: str | None = None) -> str | None:
        self._decode = decode
        s = self.settings
        self._ensure_group(s.input_stream, "0")
        # Commands sent while no worker ran have timed out for their callers: start at the end.
        self._ensure_group(s.control_stream, "$")
        until = self._last_delivered()
        if entry_key(after) is None:  # no checkpoint: from the oldest entry a dead consumer left pending
            oldest = self.sync.xpending(s.input_stream, s.consumer_group).get("min")
            oldest_key = entry_key(None if oldest is None else _id(oldest))
            after = until if oldest_key is None else entry_text(entry_before(oldest_key))
        after_key, until_key = entry_key(after), entry_key(until)
        assert after is not None and after_key is not None and until_key is not None
        self._replay = (after, until) if until_key > after_key else None
        if self._replay is not None:
            self._warn_if_trimmed(after_key)
        self._pool = ThreadPoolExecutor(self._decode_threads, thread_name_prefix="foveate-decode")
        self._stop.clear()
        self._thread = threading.Thread(target=self._intake, name="foveate-intake", daemon=True)
        self._thread.start()
        self._control_thread = threading.Thread(target=self._command_intake, name="foveate-commands",
                                                daemon=True)  # fmt: skip
        self._control_thread.start()
        return after

    def _last_delivered(self) -> str:
        """The group's last delivered entry id: entries after it were never read by any consumer."""
        for group in self.sync.xinfo_groups(self.settings.input_stream):
            info = _fields(group)
            if _id(info["name"]) == self.settings.consumer_group:
                return _id(info["last-delivered-id"])
        raise RuntimeError(f"consumer group {self.settings.consumer_group} vanished")  # created just before

    def _warn_if_trimmed(self, after: tuple[int, int]) -> None:
        info = _fields(self.sync.xinfo_stream(self.settings.input_stream))
        deleted = entry_key(_id(info.get("max-deleted-entry-id") or b""))
        if deleted is not None and deleted > after:
            logger.error(
                "entries of %s after the checkpoint (offset %s) were trimmed or deleted before this "
                "restart (up to %s): those fixations are lost; raise FOVEATE_STREAM_MAXLEN or "
                "checkpoint more often (FOVEATE_CHECKPOINT_INTERVAL_S)",
                self.settings.input_stream, entry_text(after), entry_text(deleted),
            )  # fmt: skip

    def _replay_some(self) -> None:
        """Re-read the next entries of the start's replay range (``_replay``), in order."""
        assert self._replay is not None
        s = self.settings
        after, until = self._replay
        entries: Any = self.sync.xrange(s.input_stream, min="(" + after, max=until, count=256)
        if entries:
            self._accept([[s.input_stream.encode(), entries]])
            metrics.REPLAYED.inc(len(entries))
            after = _id(entries[-1][0])
        if len(entries) < 256 or after == until:
            logger.info("re-read the entries after the checkpoint up to %s", until)
            self._replay = None
        else:
            self._replay = (after, until)

    def _intake(self) -> None:
        """Read entries (the start's replay first, then claims and new ones), decode, queue them in order."""
        s = self.settings
        last_claim = 0.0
        resp: Any
        while not self._stop.is_set():
            try:
                if self._replay is not None:
                    self._replay_some()
                    continue
                if time.monotonic() - last_claim > s.claim_idle_ms / 2000.0:
                    last_claim = time.monotonic()
                    self._claim()
                resp = self.sync.xreadgroup(
                    s.consumer_group, s.consumer_name, {s.input_stream: ">"}, count=s.max_batch, block=200
                )  # fmt: skip
                self._accept(resp)
            except RedisError as exc:
                self._log_error("reading from Redis failed", exc)
                self._stop.wait(1.0)

    def _command_intake(self) -> None:
        """Read commands into the front of the inbox: apart from the fixations, so that a backlog of
        them (or a full inbox) never holds a command back."""
        s = self.settings
        resp: Any
        while not self._stop.is_set():
            try:
                resp = self.sync.xreadgroup(
                    s.consumer_group, s.consumer_name, {s.control_stream: ">"}, count=64, block=200
                )  # fmt: skip
                self._accept(resp)
            except RedisError as exc:
                self._log_error("reading commands from Redis failed", exc)
                self._stop.wait(1.0)

    def _claim(self) -> None:
        """Take over entries another (dead) consumer has left pending for ``claim_idle_ms``."""
        s = self.settings
        resp = self.sync.xautoclaim(s.input_stream, s.consumer_group, s.consumer_name, s.claim_idle_ms,
                                    start_id="0-0", count=256)  # fmt: skip
        entries = [(eid, fields) for eid, fields in resp[1] if fields is not None]
        with self._lock:
            entries = [(eid, f) for eid, f in entries if _id(eid) not in self._inflight]
        if entries:
            logger.warning(
                "claimed %d pending fixations from a consumer idle for %d ms", len(entries), s.claim_idle_ms
            )
            self._accept([[s.input_stream.encode(), entries]])

    def _accept(self, resp: Any) -> None:
        s = self.settings
        for stream, entries in resp or []:
            name = _id(stream)
            if name == s.input_stream:
                fixes = [fixation_from_fields(_fields(f), _id(eid)) for eid, f in entries]
                with self._lock:
                    self._inflight.update(fix.entry_id for fix in fixes if fix.entry_id)
                assert self._pool is not None and self._decode is not None
                # map keeps the order; decoding runs in the pool while the worker ticks.
                for fix in self._pool.map(self._decode_one, fixes):
                    self._put(fix)
            else:
                for eid, f in entries:
                    fields = _fields(f)
                    if not self._trusted(fields):
                        self.sync.xack(s.control_stream, s.consumer_group, _id(eid))
                        continue
                    ctl = control_from_fields(fields, _id(eid))
                    deadline = _deadline(fields)
                    if time.time() > deadline + _CONTROL_GRACE_S or not self.inbox.put_command(ctl):
                        logger.info("dropping command %s past its deadline or over the inbox's limit",
                                    ctl.command)  # fmt: skip
                        self.sync.xack(s.control_stream, s.consumer_group, _id(eid))
                        continue

    def _trusted(self, fields: dict[str, bytes]) -> bool:
        """Whether a control entry comes from an API holding the secret (and is not a replay)."""
        if self._secret is None:
            return True
        now = time.time()
        request_id = fields.get("request_id", b"").decode("utf-8", "replace")
        if verify_control(fields, self._secret) and request_id not in self._seen_commands:
            self._seen_commands = {r: d for r, d in self._seen_commands.items() if d + _CONTROL_GRACE_S > now}
            self._seen_commands[request_id] = _deadline(fields)
            return True
        metrics.REJECTED_MESSAGES.labels(reason="unsigned_command").inc()
        logger.warning("dropped a command on %s that is unsigned, forged or replayed",
                       self.settings.control_stream)  # fmt: skip
        return False

    def _decode_one(self, fix: Fixation) -> Fixation:
        if fix.problem is None and self._decode is not None:
            self._decode(fix)
        return fix

    def _put(self, fix: Fixation) -> None:
        while not self._stop.is_set() and not self.inbox.put_fixation(fix, timeout=0.2):
            pass

    def get(self, timeout: float) -> Message | None:
        return self.inbox.get(timeout)

    def commands(self) -> list[Control]:
        return self.inbox.commands()

    def reply(self, replies: Sequence[tuple[Message, dict[str, Any]]]) -> None:
        s = self.settings
        pipe = self.sync.pipeline(transaction=False)
        acks: dict[str, list[str]] = {s.input_stream: [], s.control_stream: []}
        for msg, payload in replies:
            if isinstance(msg, Fixation):
                fields = result_fields(msg, payload)
                pipe.xadd(s.results_stream, fields, maxlen=s.results_maxlen, approximate=True)  # type: ignore[arg-type]
                if payload.get("ok") and payload.get("status", "applied") == "applied":
                    key = f"{s.results_stream}:{msg.stream_id}"
                    pipe.xadd(key, fields, maxlen=s.stream_results_maxlen, approximate=True)  # type: ignore[arg-type]
                    pipe.expire(key, _RESULTS_TTL_S)
                if msg.entry_id:
                    acks[s.input_stream].append(msg.entry_id)
            elif msg.entry_id:
                acks[s.control_stream].append(msg.entry_id)
            if msg.request_id:
                key = s.result_key_prefix + msg.request_id
                pipe.rpush(key, json.dumps(payload))
                pipe.expire(key, s.result_ttl_s)
        for stream, ids in acks.items():
            if ids:
                pipe.xack(stream, s.consumer_group, *ids)
        try:
            pipe.execute()
        except RedisError as exc:
            # Unacknowledged entries stay pending; a restarted worker re-reads them, and the
            # worker's per-stream last entry id keeps them from being applied twice.
            self._log_error("publishing results failed", exc)
        with self._lock:
            self._inflight.difference_update(acks[s.input_stream])

    def forget_stream(self, stream_id: str) -> None:
        try:
            self.sync.delete(f"{self.settings.results_stream}:{stream_id}")
        except RedisError as exc:
            self._log_error("deleting a results stream failed", exc)

    def heartbeat(self, info: dict[str, Any]) -> None:
        payload = json.dumps({**info, "ts": time.time(), "consumer": self.settings.consumer_name})
        try:
            self.sync.set(
                self.settings.heartbeat_key, payload, px=int(2000 * self.settings.heartbeat_timeout_s)
            )
        except RedisError as exc:
            self._log_error("writing the heartbeat failed", exc)

    def backlog(self) -> int:
        now = time.monotonic()
        if now - self._backlog_cache[0] < 1.0:
            return self._backlog_cache[1] + self.inbox.fixations()
        try:
            groups = self.sync.xinfo_groups(self.settings.input_stream)
            value = self._count_backlog(groups, unread_only=True) or 0
        except RedisError:
            value = self._backlog_cache[1]
        self._backlog_cache = (now, value)
        return value + self.inbox.fixations()

    def stop_worker(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._control_thread):
            if thread is not None:
                thread.join(timeout=5.0)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    def _log_error(self, what: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error_log > 5.0:  # one line per 5 s while Redis is down, not thousands
            self._last_error_log = now
            logger.error("%s (Redis at %s): %s", what, self.safe_url, exc)
