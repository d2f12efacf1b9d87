"""A stop agreed while fixations keep arriving still ends: two gloo ranks as real processes (started as
torchrun starts them), a real redis-server, one checkpoint folder, and a rig that keeps writing
fixations into both ranks' shards through the whole stop.

The drain goes on while any rank's shard holds entries it has not answered, so with traffic that never
pauses only its deadline (``DRAIN_S``, agreed by the ranks) ends it: every rank must still exit 0 after
a committed group checkpoint. The test waits on the exits with a generous bound (a hang fails it); it
asserts nothing about how long the drain took.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from service.shards import rank_of
from tests.service._dist_support import start_ranks, wait_for_heartbeats
from tests.service._support import png

pytestmark = pytest.mark.slow  # two worker processes with torch: about 30-60 s on 2 cores

WORLD = 2
STREAMS = [f"rig-{i}" for i in range(6)]  # rig-0, 1, 3 on rank 0; rig-2, 4, 5 on rank 1
PER_ROUND = 4  # fixations of each stream the rig writes at once
BOUND_S = 120  # a wait longer than this is a hang (the drain's deadline is 10 s, collectives 20 s)


class Rig(threading.Thread):
    """Writes fixations of every stream into its rank's shard, again and again, until stopped: more
    than the ranks learn (one fixation of a stream per tick), so that their shards never run dry."""

    def __init__(self, redis_url: str) -> None:
        super().__init__(name="rig", daemon=True)
        self.r = redis.Redis.from_url(redis_url)
        # flat patches: small PNGs, so that the growing shards stay small in Redis
        self.patches = [png(np.full((32, 32, 3), 40 * k, dtype=np.uint8)) for k in range(len(STREAMS))]
        self.done = threading.Event()
        self.rounds = 0

    def run(self) -> None:
        while not self.done.is_set():
            pipe = self.r.pipeline(transaction=False)
            for sid, data in zip(STREAMS, self.patches, strict=True):
                for _ in range(PER_ROUND):
                    pipe.xadd(f"foveate:fixations:{rank_of(sid, WORLD)}", {"stream_id": sid, "patch": data})
            pipe.execute()
            self.rounds += 1
            self.done.wait(0.02)  # a steady stream, at most about 1,200 fixations a second


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    from bench._servers import RedisServer
    from tests.conftest import require_server_binary

    server = RedisServer.start_in(tmp_path / "redis", binary=require_server_binary("redis-server"))
    try:
        yield server.url
    finally:
        server.stop()


def _answered(r: redis.Redis, sid: str) -> int:
    """Fixations of ``sid`` the group has applied (its results stream)."""
    return int(r.xlen(f"foveate:results:{sid}"))


def test_a_stop_while_fixations_keep_arriving_ends_with_a_checkpoint(redis_url: str, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoints" / "foveate.pt"
    r = redis.Redis.from_url(redis_url)
    ranks = start_ranks(WORLD, redis_url, tmp_path, "drain", checkpoint=checkpoint)
    rig = Rig(redis_url)
    try:
        wait_for_heartbeats(r, ranks, BOUND_S)
        rig.start()
        deadline = time.monotonic() + BOUND_S
        while not all(_answered(r, sid) for sid in STREAMS):  # both ranks learn from the rig
            alive = all(p.process.poll() is None for p in ranks)
            assert alive and time.monotonic() < deadline, ranks[0].tail()
            time.sleep(0.1)
        before = json.loads((checkpoint / "manifest.json").read_text())["generation"]
        ranks[-1].process.send_signal(signal.SIGTERM)  # the rig goes on writing through the stop
        for proc in ranks:
            assert proc.process.wait(timeout=BOUND_S) == 0, proc.tail()
        assert rig.is_alive(), "the rig stopped writing before the ranks exited"
    finally:
        rig.done.set()
        rig.join(timeout=30)
        for proc in ranks:
            proc.stop(signal.SIGKILL, timeout=10)
    for proc in ranks:
        assert "the ranks agreed to stop" in proc.log.read_text(), proc.tail()
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["ranks"] == WORLD and manifest["generation"] > before  # the stop's group checkpoint
    assert sorted(sid for sid, _ in manifest["streams"]) == sorted(STREAMS)
