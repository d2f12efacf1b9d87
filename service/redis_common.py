"""What both halves of ``RedisBroker`` share: the settings, where Redis is (and how log lines may name
it), the control secret, the consumer group's backlog, rate-limited error logs, and small helpers
for redis-py's replies. The halves: service/redis_api.py (the API's) and service/redis_worker.py
(the worker's); service/redis_broker.py joins them and documents the keys.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from service.broker import Broker
from service.config import Settings

logger = logging.getLogger("service.redis_broker")


def str_fields(raw: dict[Any, Any]) -> dict[str, bytes]:
    return {(k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)): v for k, v in raw.items()}


def redact_url(url: str) -> str:
    """Where a Redis URL points, without its scheme, user and password: what log lines may show.

    >>> redact_url("redis://foveate:s3cret@redis:6379/0")
    'redis:6379/0'
    """
    _, sep, rest = url.partition("://")
    return rest.rpartition("@")[2] if sep else "(the Redis of FOVEATE_REDIS_URL)"


def id_text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


class RedisSide(Broker):
    """The state and helpers both sides use (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        if settings.redis_url is None:
            raise ValueError("RedisBroker needs settings.redis_url")
        self.settings = settings
        self.url: str = settings.redis_url
        self.safe_url = redact_url(self.url)  # what log lines may show: host, port and database
        secret = settings.control_secret
        self._secret = secret.get_secret_value().encode() if secret is not None else None
        self._last_error_log = 0.0

    def _count_backlog(self, groups: list[dict[Any, Any]], *, unread_only: bool) -> int | None:
        for group in groups:
            info = str_fields(group)
            name = info.get("name")
            if (name.decode() if isinstance(name, bytes) else name) != self.settings.consumer_group:
                continue
            lag = info.get("lag")
            unread = int(lag) if lag is not None else 0
            return unread if unread_only else unread + int(info.get("pending") or 0)
        return None

    def _log_error(self, what: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error_log > 5.0:  # one line per 5 s while Redis is down, not thousands
            self._last_error_log = now
            logger.error("%s (Redis at %s): %s", what, self.safe_url, exc)
