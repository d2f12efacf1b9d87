"""``foveate worker --distributed`` end to end: two gloo ranks as real processes, a real redis-server,
the real API app on a real uvicorn (``FOVEATE_SHARDS=2``).

Each rank is started as torchrun starts one (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), so that the test can kill one rank without torchrun's agent
stopping the other. The tests run in order on one group: fixations of several streams over HTTP are
answered and land in their rank's shard; both ranks hold bit-identical models afterwards; a reset
reaches its stream's rank; a broken message on one rank keeps the ranks in step; SIGTERM to one rank
stops both (exit 0); and, in a second group on the same Redis, a killed rank makes the other exit
with status 3 and a ``RankLost`` in its log, not hang.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from service.dist_launch import EXIT_RANK_LOST
from service.shards import rank_of
from tests.service._dist_support import (
    ask_rank,
    free_ports,
    metric_value,
    patch,
    start_ranks,
    wait_for_heartbeats,
)
from tests.service._support import ServiceProcess, ThreadedServer, post_patch, small_settings

pytestmark = pytest.mark.slow  # two worker processes with torch, and the API: about 30-60 s on 2 cores

WORLD = 2
STREAMS = [f"rig-{i}" for i in range(6)]  # rig-0, 1, 3 on rank 0; rig-2, 4, 5 on rank 1
# a rank that outlives its peer by more than this is a hang (collective timeout below: 20 s)
EXIT_BOUND_S = 120


@dataclass
class Group:
    """The ranks, the API in front of them, and the Redis they share."""

    ranks: list[ServiceProcess]
    api: ThreadedServer
    redis_url: str
    client: httpx.Client
    tmp: Path
    started: list[list[ServiceProcess]]  # every group of ranks started, for the teardown
    metrics_port: int  # the first group's rank r serves its metrics on metrics_port + r

    def restart(self, tag: str) -> None:
        """A new group of ranks on the same Redis (its consumer groups and shards exist already)."""
        self.ranks = start_ranks(WORLD, self.redis_url, self.tmp, tag)
        self.started.append(self.ranks)
        wait_for_heartbeats(redis.Redis.from_url(self.redis_url), self.ranks, EXIT_BOUND_S)

    def ask_rank(self, command: str, rank: int, **args: Any) -> dict[str, Any]:
        return ask_rank(self.redis_url, WORLD, command, rank, **args)


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    from bench._servers import RedisServer
    from service.api.main import create_app
    from tests.conftest import require_server_binary

    tmp = tmp_path_factory.mktemp("dist")
    redis_srv = RedisServer.start_in(tmp / "redis", binary=require_server_binary("redis-server"))
    metrics_port = free_ports(WORLD)
    ranks = start_ranks(WORLD, redis_srv.url, tmp, "first", metrics_port=metrics_port)
    api = ThreadedServer(create_app(small_settings(redis_url=redis_srv.url, shards=WORLD))).start()
    client = httpx.Client(base_url=api.url, timeout=60.0)
    started = [ranks]
    try:
        wait_for_heartbeats(redis.Redis.from_url(redis_srv.url), ranks, EXIT_BOUND_S)
        ranks[0].wait_http(api.url + "/readyz")
        yield Group(ranks, api, redis_srv.url, client, tmp, started, metrics_port)
    finally:
        client.close()
        api.stop()
        for proc in (p for group in started for p in group):
            proc.stop(signal.SIGKILL, timeout=10)
        redis_srv.stop()


def _commands(r: redis.Redis, rank: int, command: str) -> list[str]:
    """The stream ids of the ``command`` entries in rank ``rank``'s control shard."""
    entries = r.xrange(f"foveate:control:{rank}")
    return [json.loads(f[b"args"])["stream_id"] for _, f in entries if f[b"command"] == command.encode()]


def test_fixations_reach_their_rank_and_are_answered(group: Group) -> None:
    assert {rank_of(s, WORLD) for s in STREAMS} == set(range(WORLD))  # both ranks get streams
    for i in range(4):
        for k, sid in enumerate(STREAMS):
            out = post_patch(group.client, sid, patch(10 * k + i), seq=i)
            assert (out["status"], out["step"], out["stream_id"]) == ("applied", i + 1, sid)
    r = redis.Redis.from_url(group.redis_url)
    for rank in range(WORLD):  # each rank's input shard holds exactly its streams' fixations
        ids = [fields[b"stream_id"].decode() for _, fields in r.xrange(f"foveate:fixations:{rank}")]
        assert sorted(set(ids)) == sorted(s for s in STREAMS if rank_of(s, WORLD) == rank)
        assert len(ids) == 4 * len(set(ids))
        streams = group.ask_rank("streams", rank)["streams"]
        assert sorted(s["stream_id"] for s in streams) == sorted(set(ids))  # state on its rank only
    assert not r.exists("foveate:fixations")
    listed = group.client.get("/v1/streams").json()  # asked of every rank, joined
    assert sorted(s["stream_id"] for s in listed["streams"]) == sorted(STREAMS)
    for sid in STREAMS:
        assert group.client.get(f"/v1/streams/{sid}").json()["fixations"] == 4


def test_both_ranks_hold_one_model(group: Group) -> None:
    infos = [group.ask_rank("model", rank)["model"] for rank in range(WORLD)]
    assert [i["distributed"]["rank"] for i in infos] == list(range(WORLD))
    assert len({i["distributed"]["fingerprint"] for i in infos}) == 1  # bit-identical shared state
    assert len({i["updates_applied"] for i in infos}) == 1 and infos[0]["updates_applied"] > 0
    assert len({i["distributed"]["learning_ticks"] for i in infos}) == 1  # every tick on both ranks
    model = group.client.get("/v1/model").json()  # the API asks rank 0
    assert model["distributed"]["rank"] == 0
    assert model["distributed"]["fingerprint"] == infos[0]["distributed"]["fingerprint"]


def test_every_rank_counts_every_update_of_the_group(group: Group) -> None:
    # each fixation above ticked on its stream's rank and idled on the other: both applied the
    # update, so both ranks' foveate_updates_total are the group's count (the dashboard takes one)
    updates = group.ask_rank("model", 0)["model"]["updates_applied"]
    urls = [f"http://127.0.0.1:{group.metrics_port + rank}/metrics" for rank in range(WORLD)]
    deadline = time.monotonic() + EXIT_BOUND_S  # a rank counts after its tick's collectives end
    while (counts := [metric_value(url, "foveate_updates_total") for url in urls]) != [updates] * WORLD:
        assert time.monotonic() < deadline, f"ranks count {counts} updates, the group applied {updates}"
        time.sleep(0.1)


def test_a_reset_reaches_its_streams_rank(group: Group) -> None:
    sid = next(s for s in STREAMS if rank_of(s, WORLD) == 1)
    reply = group.client.post(f"/v1/streams/{sid}/reset", json={})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"stream_id": sid, "step": 0}
    r = redis.Redis.from_url(group.redis_url)
    resets = {rank: _commands(r, rank, "reset") for rank in range(WORLD)}
    assert resets == {0: [], 1: [sid]}
    assert group.client.get(f"/v1/streams/{sid}").json()["step"] == 0
    assert post_patch(group.client, sid, patch(99), seq=0)["step"] == 1  # numbered afresh


def test_broken_and_misrouted_messages_keep_the_ranks_in_step(group: Group) -> None:
    r = redis.Redis.from_url(group.redis_url)
    sid = next(s for s in STREAMS if rank_of(s, WORLD) == 0)
    r.xadd("foveate:fixations:0", {"stream_id": sid, "patch": b"not an image", "request_id": "broken"})
    item = r.blpop(["foveate:result:broken"], timeout=60)
    assert item is not None and json.loads(item[1])["error"] == "PatchError"
    other = next(s for s in STREAMS if rank_of(s, WORLD) == 1)  # written to the wrong shard: refused
    r.xadd("foveate:fixations:0", {"stream_id": other, "patch": b"x", "request_id": "misrouted"})
    item = r.blpop(["foveate:result:misrouted"], timeout=60)
    assert item is not None
    refused = json.loads(item[1])
    assert (
        refused["error"] == "InputError" and "write its fixations to foveate:fixations:1" in refused["detail"]
    )
    for k, sid in enumerate(STREAMS):  # both ranks still learn, in step
        assert post_patch(group.client, sid, patch(1000 + k), seq=10)["status"] == "applied"
    prints = {group.ask_rank("model", rank)["model"]["distributed"]["fingerprint"] for rank in range(WORLD)}
    assert len(prints) == 1


def test_a_signal_to_one_rank_stops_both(group: Group) -> None:
    first, second = group.ranks
    second.process.send_signal(signal.SIGTERM)  # as on a single worker: finish the tick, stop
    for proc in (first, second):  # the other rank stops with it: agreed, not a RankLost
        assert proc.process.wait(timeout=EXIT_BOUND_S) == 0, proc.tail()
        assert "the ranks agreed to stop" in proc.log.read_text()


def test_a_killed_rank_makes_the_other_exit_not_hang(group: Group) -> None:
    group.restart("second")
    sid = STREAMS[2]
    assert post_patch(group.client, sid, patch(7), seq=20)["status"] == "applied"  # the new group learns
    survivor, victim = group.ranks
    victim.process.send_signal(signal.SIGKILL)
    code = survivor.process.wait(timeout=EXIT_BOUND_S)  # raises TimeoutExpired on a hang
    assert code == EXIT_RANK_LOST, survivor.tail()
    log = survivor.log.read_text()
    assert "RankLost" in log and "exiting with status 3" in log, survivor.tail()
