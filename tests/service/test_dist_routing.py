"""The distributed worker's parts that need no second process: the API's routing to shards (a real
redis-server), the settings a rank refuses, and a rank's one-tick recovery from a bad fixation (a
gloo group of one, in this process).

The group's end-to-end behaviour (two ranks, HTTP, a killed rank) is tests/service/test_dist_worker.py.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch.distributed as dist

from learner.distributed import join
from learner.errors import ConfigError
from service.admission import screen
from service.broker import LocalBroker
from service.dist_launch import check_settings, rank_env, rank_settings
from service.dist_worker import DistWorker
from service.messages import Control, Fixation
from service.redis_broker import RedisBroker
from service.shards import rank_of
from tests.service._support import small_settings

STREAMS = [f"lab:p{i}" for i in range(12)]


def _entries(r: redis.Redis, key: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in r.xrange(key)]


async def _submit_and_ask(broker: RedisBroker, fixes: list[Fixation], controls: list[Control]) -> None:
    await broker.submit(fixes, wait=False)
    for ctl in controls:
        ctl.request_id = f"req-{ctl.command}-{ctl.args.get('stream_id', '')}"
        await broker._send_control(ctl, 5.0)
    await broker.close_api()


@pytest.mark.parametrize("shards", [1, 3])
def test_the_api_writes_each_stream_to_its_rank(redis_server: str, shards: int) -> None:
    broker = RedisBroker(small_settings(redis_url=redis_server, shards=shards))
    patch = np.zeros((32, 32, 3), np.uint8)
    fixes = [Fixation(sid, seq=0, patch=patch) for sid in STREAMS]
    controls = [Control("reset", {"stream_id": sid}) for sid in STREAMS[:6]] + [Control("model", {})]
    asyncio.run(_submit_and_ask(broker, fixes, controls))
    r = redis.Redis.from_url(redis_server)
    if shards == 1:  # the single worker's names, unchanged
        assert [f[b"stream_id"].decode() for f in _entries(r, "foveate:fixations")] == STREAMS
        assert len(_entries(r, "foveate:control")) == 7
        assert not r.exists("foveate:fixations:0")
        return
    assert not r.exists("foveate:fixations") and not r.exists("foveate:control")
    assert len({rank_of(s, shards) for s in STREAMS}) == shards  # every rank gets some streams
    for rank in range(shards):
        got = [f[b"stream_id"].decode() for f in _entries(r, f"foveate:fixations:{rank}")]
        assert got == [s for s in STREAMS if rank_of(s, shards) == rank]
        commands = _entries(r, f"foveate:control:{rank}")
        resets = [json.loads(f[b"args"])["stream_id"] for f in commands if f[b"command"] == b"reset"]
        assert resets == [s for s in STREAMS[:6] if rank_of(s, shards) == rank]
        assert any(f[b"command"] == b"model" for f in commands) == (rank == 0)  # the model: rank 0


async def _alive_of(broker: RedisBroker) -> tuple[bool, str]:
    try:
        return await broker.worker_alive()
    finally:
        await broker.close_api()


def test_the_api_is_ready_only_when_every_rank_beats(redis_server: str) -> None:
    broker = RedisBroker(small_settings(redis_url=redis_server, shards=2))
    r = redis.Redis.from_url(redis_server)
    beat = {"ts": 0.0, "queue_depth": 3, "service_rate": 10.0}

    async def alive() -> tuple[bool, str]:
        broker._alive_cache = (0.0, False, "")
        return await _alive_of(broker)

    r.set("foveate:worker:heartbeat:0", json.dumps({**beat, "ts": time.time()}))
    ok, why = asyncio.run(alive())
    assert not ok and "foveate:worker:heartbeat:1" in why
    r.set("foveate:worker:heartbeat:1", json.dumps({**beat, "ts": time.time()}))
    ok, _ = asyncio.run(alive())
    assert ok and broker._load == (6, 20.0)  # the load is the sum over the ranks
    # an API left at FOVEATE_SHARDS=1 in front of the ranks says what to set
    single = RedisBroker(small_settings(redis_url=redis_server))
    ok, why = asyncio.run(_alive_of(single))
    assert not ok and "set FOVEATE_SHARDS to its number of ranks" in why


def test_a_rank_refuses_a_wrong_shard_count() -> None:
    check_settings(small_settings(checkpoint_path=Path("ckpt.pt")), 2)  # group checkpoints are built
    with pytest.raises(ConfigError, match="FOVEATE_SHARDS=3 but the group has WORLD_SIZE=2"):
        check_settings(small_settings(shards=3), 2)
    check_settings(small_settings(), 2)  # FOVEATE_SHARDS unset in a worker: the world size rules
    with pytest.raises(ConfigError, match="run the single worker, `foveate worker`"):
        check_settings(small_settings(), 1)  # a group of one: shard keys that no API writes
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2 -m foveate worker --distributed"):
        rank_env({"RANK": "0"})
    assert rank_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}) == (1, 2, 1)
    s = rank_settings(small_settings(worker_metrics_port=9101), 1, 2)
    assert (s.input_stream, s.control_stream, s.heartbeat_key, s.worker_metrics_port, s.shards) == (
        "foveate:fixations:1",
        "foveate:control:1",
        "foveate:worker:heartbeat:1",
        9102,
        2,
    )
    assert s.results_stream == "foveate:results" and s.result_key_prefix == "foveate:result:"  # shared


@pytest.fixture
def rank_of_one() -> Iterator[DistWorker]:
    """A distributed worker that is the only rank of a gloo group in this process (a file store)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(str(Path(tmp) / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            settings = small_settings()
            worker = DistWorker(settings, LocalBroker(settings))
            worker.sync = join(worker.learner)  # what start() does before reading the broker
            yield worker
        finally:
            dist.destroy_process_group()


def test_a_bad_fixation_costs_one_tick_not_one_per_fixation(rank_of_one: DistWorker) -> None:
    worker = rank_of_one
    assert worker.sync is not None
    rng = np.random.default_rng(0)
    good = [
        Fixation(f"s{i}", seq=0, patch=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(3)
    ]
    bad = Fixation("bad", seq=0, patch=rng.integers(0, 256, (32, 32, 5), dtype=np.uint8))  # 5 channels
    accepted, replies = screen(worker, [good[0], bad, good[1], good[2]])
    assert len(accepted) == 4 and not replies  # decoded, admitted: only the learner can tell
    before = worker.sync.ticks
    answers = {fix.stream_id: payload for fix, payload in worker._apply(accepted)}
    assert worker.sync.ticks == before + 1  # one learning tick, as every other rank takes
    assert answers["bad"]["ok"] is False and answers["bad"]["error"] == "PatchError"
    assert all(answers[f.stream_id]["status"] == "applied" for f in good)
    assert sorted(worker.learner.stream_ids()) == ["s0", "s1", "s2"]
    # only bad fixations: still exactly one (idle) tick
    accepted, _ = screen(worker, [Fixation("bad", seq=1, patch=bad.patch)])
    (answer,) = worker._apply(accepted)
    assert worker.sync.ticks == before + 2 and answer[1]["error"] == "PatchError"


def test_a_rank_without_a_checkpoint_path_answers_the_checkpoint_command_so(rank_of_one: DistWorker) -> None:
    with pytest.raises(ConfigError, match="checkpoints are disabled: set FOVEATE_CHECKPOINT_PATH"):
        rank_of_one.execute("checkpoint", {})
    info = rank_of_one.execute("model", {})["model"]["distributed"]
    assert (info["rank"], info["world_size"], len(info["fingerprint"])) == (0, 1, 64)
