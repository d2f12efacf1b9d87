"""The worker's half of ``RedisBroker`` (service/redis_broker.py has the keys and the replay rule):
at start, find the entries to re-read after the checkpoint's input offset; then a thread reads them
and new ones (claiming those a dead consumer left pending), decodes them in a thread pool and queues
them in order in the worker's :class:`~service.broker.Inbox`; another thread reads commands into its
front, dropping unsigned ones and those past their deadline. :meth:`RedisWorkerSide.reply` publishes
the results and only then acknowledges the entries; the heartbeat carries the worker's backlog and
service rate to the API.
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
from redis.exceptions import RedisError, ResponseError

from service import metrics
from service.broker import Decoder, Inbox, Message
from service.config import Settings
from service.errors import WorkerUnavailable
from service.messages import Control, Fixation, control_from_fields, fixation_from_fields, verify_control
from service.redis_common import RedisSide, id_text, str_fields
from service.streams import entry_before, entry_key, entry_text

logger = logging.getLogger("service.redis_broker")

_CONTROL_GRACE_S = 2.0  # clock skew allowed between API and worker hosts for command deadlines
_RESULTS_TTL_S = 24 * 3600  # per-stream result streams of idle streams disappear after a day


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


class RedisWorkerSide(RedisSide):
    """Feeds the worker from Redis and publishes its replies (see the module docstring).

    ``decode_threads``: threads that decode rigs' PNG/JPEG payloads while the worker ticks.
    """

    def __init__(self, settings: Settings, *, decode_threads: int = 2, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._seen_commands: dict[str, float] = {}  # request id -> deadline: a signed command runs once
        self._decode_threads = decode_threads
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
        self._backlog_cache = (0.0, 0)  # unread entries, for the worker's gauge (the API's differs)

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
            oldest_key = entry_key(None if oldest is None else id_text(oldest))
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
            info = str_fields(group)
            if id_text(info["name"]) == self.settings.consumer_group:
                return id_text(info["last-delivered-id"])
        raise RuntimeError(f"consumer group {self.settings.consumer_group} vanished")  # created just before

    def _warn_if_trimmed(self, after: tuple[int, int]) -> None:
        info = str_fields(self.sync.xinfo_stream(self.settings.input_stream))
        deleted = entry_key(id_text(info.get("max-deleted-entry-id") or b""))
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
            after = id_text(entries[-1][0])
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
            entries = [(eid, f) for eid, f in entries if id_text(eid) not in self._inflight]
        if entries:
            logger.warning(
                "claimed %d pending fixations from a consumer idle for %d ms", len(entries), s.claim_idle_ms
            )
            self._accept([[s.input_stream.encode(), entries]])

    def _accept(self, resp: Any) -> None:
        s = self.settings
        for stream, entries in resp or []:
            name = id_text(stream)
            if name == s.input_stream:
                fixes = [fixation_from_fields(str_fields(f), id_text(eid)) for eid, f in entries]
                with self._lock:
                    self._inflight.update(fix.entry_id for fix in fixes if fix.entry_id)
                assert self._pool is not None and self._decode is not None
                # map keeps the order; decoding runs in the pool while the worker ticks.
                for fix in self._pool.map(self._decode_one, fixes):
                    self._put(fix)
            else:
                for eid, f in entries:
                    fields = str_fields(f)
                    if not self._trusted(fields):
                        self.sync.xack(s.control_stream, s.consumer_group, id_text(eid))
                        continue
                    ctl = control_from_fields(fields, id_text(eid))
                    deadline = _deadline(fields)
                    if time.time() > deadline + _CONTROL_GRACE_S or not self.inbox.put_command(ctl):
                        logger.info("dropping command %s past its deadline or over the inbox's limit",
                                    ctl.command)  # fmt: skip
                        self.sync.xack(s.control_stream, s.consumer_group, id_text(eid))
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
                    acks.setdefault(msg.input_key or s.input_stream, []).append(msg.entry_id)
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

    def journal(self, fields: dict[str, str]) -> str:
        try:
            return id_text(self.sync.xadd(self.settings.journal_stream, fields))  # type: ignore[arg-type]
        except RedisError as exc:
            self._log_error("writing the command journal failed", exc)
            raise WorkerUnavailable(
                f"Redis did not take the command's journal record ({exc}); the command was not "
                "applied: retry it once Redis is reachable"
            ) from exc

    def journal_after(self, after: str | None) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        low = "-" if after is None else "(" + after
        while True:
            entries: Any = self.sync.xrange(self.settings.journal_stream, min=low, max="+", count=1024)
            out.extend((id_text(eid), str_fields(f)) for eid, f in entries)
            if len(entries) < 1024:
                return out
            low = "(" + out[-1][0]

    def journal_last(self) -> str | None:
        last: Any = self.sync.xrevrange(self.settings.journal_stream, max="+", min="-", count=1)
        return id_text(last[0][0]) if last else None

    def journal_trim(self, through: str) -> None:
        key = entry_key(through)
        if key is None:
            return
        try:  # MINID keeps the ids at or above the one just after ``through``
            self.sync.xtrim(self.settings.journal_stream, minid=f"{key[0]}-{key[1] + 1}", approximate=False)
        except RedisError as exc:  # kept records are harmless: the next commit trims them
            self._log_error("trimming the command journal failed", exc)

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

    def unanswered_after(self, offset: str | None) -> bool:
        """Whether the input stream holds an entry after ``offset`` (every entry up to it answered):
        unread, or read and not answered yet (being decoded, queued, in a tick). Read from Redis
        now: :meth:`backlog`'s reading may be a second old, and a drain that trusted it could end
        while the shard holds entries, which a re-partition would then have to hand over (the same
        XRANGE as the hand-over's, service/handover.py). Redis unreachable: yes (the drain is bounded)."""
        if self.inbox.fixations():
            return True
        start = "-" if offset is None else "(" + offset
        try:
            return bool(self.sync.xrange(self.settings.input_stream, min=start, max="+", count=1))
        except RedisError as exc:
            self._log_error("reading the input stream's end failed", exc)
            return True

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
