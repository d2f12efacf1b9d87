"""``RedisProducer``: XADD fixations straight into foveate's Redis input stream, for high rates.

A rig that can reach the service's Redis skips HTTP: it writes each fixation as one entry of the
input stream ``foveate:fixations`` (the fields are specified in ``docs/redis-format.md``; the
service's parser is ``service.messages.fixation_from_fields``), pipelining many entries in one
round trip. The worker answers every entry that carries a ``request_id`` by pushing the JSON reply
onto the list ``foveate:result:<request_id>`` (kept ``FOVEATE_RESULT_TTL_S`` seconds), which
:meth:`RedisProducer.results` pops; all results also go to the capped streams ``foveate:results``
and ``foveate:results:<stream_id>``.

Unlike the API, a producer is not refused when the worker lags: the input stream is capped
(``MAXLEN ~``) and the oldest unread entries would be trimmed. Watch :meth:`RedisProducer.backlog`
(or pass ``max_backlog``) to stay well below the cap.

Examples
--------
>>> import numpy as np
>>> from clients.sdk import FixationItem
>>> with RedisProducer("redis://127.0.0.1:6379/0") as producer:          # doctest: +SKIP
...     ids = producer.send_many([FixationItem("rig1", patch=np.zeros((64, 64, 3), np.uint8), reset=True),
...                               FixationItem("rig1", patch=np.ones((64, 64, 3), np.uint8))])
...     [r.step for r in producer.results(ids)]
[1, 2]
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Unpack

import redis
from redis.exceptions import RedisError, ResponseError

from clients.sdk import errors
from clients.sdk.fixation import Encoding, FixationFields, FixationItem, ImageLike
from clients.sdk.models import FixationResult

__all__ = ["RedisProducer"]

_STREAM_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class RedisProducer:
    """Write fixations to the service's Redis input stream and read their results.

    Parameters
    ----------
    url : str
        The service's Redis, e.g. ``redis://127.0.0.1:6379/0`` (``FOVEATE_REDIS_URL``).
    stream_key : str
        The input stream (``FOVEATE_INPUT_STREAM``).
    result_key_prefix : str
        Prefix of the per-request reply lists (``FOVEATE_RESULT_KEY_PREFIX``).
    consumer_group : str
        The workers' consumer group (``FOVEATE_CONSUMER_GROUP``), for :meth:`backlog`.
    heartbeat_key : str
        The worker's heartbeat (``FOVEATE_HEARTBEAT_KEY``), for :meth:`worker_alive`.
    maxlen : int
        Approximate cap of the input stream (``FOVEATE_STREAM_MAXLEN``).
    max_backlog : int, optional
        Refuse (``QueueFull``) to send while more entries than this wait for the worker.
    encoding : {"raw", "png", "jpeg"}
        How numpy patches travel; raw pixels (default) cost the worker no decoding.
    """

    def __init__(
        self,
        url: str,
        *,
        stream_key: str = "foveate:fixations",
        result_key_prefix: str = "foveate:result:",
        consumer_group: str = "foveate-workers",
        heartbeat_key: str = "foveate:worker:heartbeat",
        maxlen: int = 100_000,
        max_backlog: int | None = None,
        encoding: Encoding = "raw",
        socket_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.stream_key = stream_key
        self.result_key_prefix = result_key_prefix
        self.consumer_group = consumer_group
        self.heartbeat_key = heartbeat_key
        self.maxlen = maxlen
        self.max_backlog = max_backlog
        self.encoding: Encoding = encoding
        self._slice = max(0.1, min(5.0, socket_timeout / 2))
        self._redis = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=socket_timeout)

    def _unreachable(self, exc: RedisError) -> errors.TransportError:
        if isinstance(exc, redis.ConnectionError):
            return errors.ConnectError(f"cannot reach Redis at {self.url}: {exc}")
        return errors.TransportError(f"Redis at {self.url} failed: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------ sending

    def fields(
        self, item: FixationItem, request_id: str | None, return_prediction: bool = False
    ) -> dict[str, bytes | str]:
        """The entry fields of one fixation (docs/redis-format.md)."""
        if not _STREAM_ID.match(item.stream_id):
            raise errors.InputError(
                f"stream_id {item.stream_id[:140]!r} is invalid: "
                "use 1-128 characters from A-Z a-z 0-9 _ . : -"
            )
        kind, data, extra = item.image(self.encoding)
        out: dict[str, bytes | str] = {"stream_id": item.stream_id, kind: data}
        for name, value in {**item.meta(), **extra}.items():
            if name == "reset":
                out[name] = "1" if value else "0"
            elif name == "shape":
                out[name] = ",".join(str(n) for n in value)
            else:
                out[name] = repr(value) if isinstance(value, float) else str(value)
        if request_id is not None:
            out["request_id"] = request_id
        if return_prediction:
            out["return_prediction"] = "1"
        return out

    def send(
        self,
        stream_id: str,
        patch: ImageLike | None = None,
        *,
        return_prediction: bool = False,
        **fields: Unpack[FixationFields],
    ) -> str:
        """XADD one fixation (arguments as :meth:`FoveateClient.post_fixation`); returns its request id."""
        return self.send_many(
            [FixationItem(stream_id, patch, **fields)], return_prediction=return_prediction
        )[0]

    def send_many(
        self,
        items: Sequence[FixationItem | Mapping[str, Any]],
        *,
        return_prediction: bool = False,
        want_results: bool = True,
    ) -> list[str]:
        """XADD many fixations in one pipelined round trip, in order; returns their request ids.

        Each stream's entries are applied in the order they are added. With ``want_results=False``
        no request id is sent, so the worker publishes the results only to the results streams
        (nothing to pop; the returned ids are empty strings).
        """
        entries = [(it if isinstance(it, FixationItem) else FixationItem(**it)) for it in items]
        ids = [uuid.uuid4().hex if want_results else "" for _ in entries]
        payloads = [
            self.fields(e, rid or None, return_prediction) for e, rid in zip(entries, ids, strict=True)
        ]
        if self.max_backlog is not None:
            waiting = self.backlog()
            if waiting + len(payloads) > self.max_backlog:
                raise errors.QueueFull(
                    f"{waiting} fixations wait for the worker in {self.stream_key} (max_backlog "
                    f"{self.max_backlog}); retry later"
                )
        pipe = self._redis.pipeline(transaction=False)
        for payload in payloads:
            pipe.xadd(self.stream_key, payload, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
        try:
            pipe.execute()
        except RedisError as exc:
            raise self._unreachable(exc) from exc
        return ids

    # ------------------------------------------------------------ results

    def result(self, request_id: str, timeout: float = 10.0) -> FixationResult:
        """Wait for one fixation's result (``WorkerTimeout`` after ``timeout`` s; its error is raised)."""
        return self.results([request_id], timeout)[0]

    def results(self, request_ids: Sequence[str], timeout: float = 10.0) -> list[FixationResult]:
        """Wait for the results of these requests, in their order; ``timeout`` bounds the whole wait.

        Raises the first rejected fixation's error (``PatchError``, ``InputError``, ...) after
        collecting every reply, so no reply is left behind.
        """
        deadline = time.monotonic() + timeout
        replies: list[dict[str, Any]] = []
        for rid in request_ids:
            if not rid:
                raise errors.InputError("a fixation sent with want_results=False has no result to wait for")
            item = None
            while item is None and (left := deadline - time.monotonic()) > 0:
                # In slices shorter than the socket timeout, so a long wait is not a socket error.
                try:
                    item = self._redis.blpop(
                        [self.result_key_prefix + rid], timeout=max(min(left, 5.0), 0.01)
                    )
                except RedisError as exc:
                    raise self._unreachable(exc) from exc
            if item is None:
                raise errors.WorkerTimeout(
                    f"no result for request {rid} within {timeout:g} s: is a worker running "
                    f"(worker_alive() is {self.worker_alive()})? "
                    f"The fixation stays queued in {self.stream_key}"
                )
            replies.append(json.loads(item[1]))
        failed = [r for r in replies if not r.get("ok")]
        if failed:
            raise errors.error_from_body(failed[0])
        return [FixationResult.from_json(r) for r in replies]

    # ------------------------------------------------------------ state

    def worker_alive(self, max_age_s: float = 10.0) -> bool:
        """True when the worker's heartbeat is younger than ``max_age_s``."""
        try:
            raw = self._redis.get(self.heartbeat_key)
        except RedisError as exc:
            raise self._unreachable(exc) from exc
        if raw is None:
            return False
        return time.time() - float(json.loads(raw).get("ts", 0.0)) <= max_age_s

    def backlog(self) -> int:
        """Entries not yet applied: unread by the workers' group plus read but unacknowledged."""
        try:
            groups = self._redis.xinfo_groups(self.stream_key)
        except ResponseError:  # no stream yet
            return 0
        except RedisError as exc:
            raise self._unreachable(exc) from exc
        for group in groups:
            name = group.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == self.consumer_group:
                return int(group.get("lag") or 0) + int(group.get("pending") or 0)
        try:
            return int(self._redis.xlen(self.stream_key))  # no group yet: nothing was read
        except RedisError as exc:
            raise self._unreachable(exc) from exc

    def close(self) -> None:
        self._redis.close()

    def __enter__(self) -> RedisProducer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
