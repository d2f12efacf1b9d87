"""Which broker a service runs on, chosen from its settings.

Apart from both implementations so that imports go one way: ``service.broker`` (the interface and
the in-process queue) knows nothing of Redis, ``service.redis_broker`` builds on ``service.broker``,
and this module picks between them.
"""

from __future__ import annotations

from service.broker import Broker, LocalBroker
from service.config import Settings
from service.redis_broker import RedisBroker


def make_broker(settings: Settings) -> Broker:
    """The broker the settings ask for: Redis when ``redis_url`` is set, in-process otherwise."""
    if settings.redis_url is None:
        return LocalBroker(settings)
    return RedisBroker(settings)
