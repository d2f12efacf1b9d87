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

from service.config import Settings
from service.redis_api import RedisApiSide
from service.redis_common import redact_url
from service.redis_worker import RedisWorkerSide, result_fields

__all__ = ["RedisBroker", "redact_url", "result_fields"]


class RedisBroker(RedisApiSide, RedisWorkerSide):
    """Broker over Redis Streams (see the module docstring for the keys).

    The API's half is service/redis_api.py, the worker's service/redis_worker.py; ``foveate serve
    --redis`` uses both in this one object, and ``foveate api`` / ``foveate worker`` one each.

    Parameters
    ----------
    settings
        ``redis_url`` and the key names, limits and timeouts.
    decode_threads
        Threads that decode rigs' PNG/JPEG payloads while the worker ticks.
    """

    def __init__(self, settings: Settings, *, decode_threads: int = 2) -> None:
        super().__init__(settings, decode_threads=decode_threads)
