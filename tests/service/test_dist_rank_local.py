"""What one rank of a distributed worker keeps to itself, in one process: a gloo group of one rank (a
file store), a real learner, a real spill folder, a real redis-server.

- Its spill folder is ``<checkpoint>.spill/rank-<r>``: emptying it at start, and spilling into it,
  leave another rank's spilled streams alone (the ranks of one machine share the checkpoint's folder).
- The stop's drain asks Redis now whether the rank's shard holds entries past its input offset:
  ``backlog``'s reading may be a second old, and a drain that trusted it would end while the shard
  holds entries (which a re-partition would then have to hand over).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
import torch.distributed as dist

from service.broker import LocalBroker
from service.dist_launch import rank_settings
from service.dist_worker import DistWorker
from service.redis_broker import RedisBroker
from tests.service._support import small_settings


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    """The default process group: gloo, one rank (rank 0)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_rank_spills_into_a_folder_of_its_own(tmp_path: Path, one_rank: None) -> None:
    checkpoint = tmp_path / "foveate.pt"
    spill = tmp_path / "foveate.pt.spill"
    other = spill / "rank-1"  # what rank 1 of the group has spilled meanwhile
    other.mkdir(parents=True)
    (other / "stream-of-rank-1.pt").write_bytes(b"the state of a stream that lives on rank 1")
    worker = DistWorker(small_settings(checkpoint_path=checkpoint), LocalBroker(small_settings()))
    mine = worker.learner.states.spill_dir
    assert mine == spill / "rank-0" and mine.is_dir()  # made (and emptied) at start
    learner = worker.learner
    learner.limit_memory(learner.memory_per_stream(), mine)  # one stream resident: the others spill
    x = torch.randn(1, learner.cfg.M, dtype=learner.dtype)
    for k in range(4):
        learner.tick_features([f"s{k}"], x)
    assert learner.states.spilled == 3 and len(list(mine.iterdir())) == 3  # spilled into rank 0's
    assert sorted(p.name for p in spill.iterdir()) == ["rank-0", "rank-1"]  # nothing beside them
    assert (other / "stream-of-rank-1.pt").read_bytes() == b"the state of a stream that lives on rank 1"


def test_the_drain_reads_the_shard_now(redis_server: str, one_rank: None) -> None:
    settings = rank_settings(small_settings(redis_url=redis_server), 0, 1)
    r = redis.Redis.from_url(redis_server)
    r.xgroup_create(settings.input_stream, settings.consumer_group, id="0", mkstream=True)
    worker = DistWorker(settings, RedisBroker(settings))
    assert worker.broker.backlog() == 0  # a reading of the backlog, now cached for a second
    assert not worker._unanswered()
    entry = r.xadd(settings.input_stream, {"stream_id": "s0", "patch": b"x"}).decode()
    assert worker._unanswered()  # in the shard, past the offset: the drain goes on
    worker.offset.opened(entry)
    worker.offset.answered([entry])
    assert not worker._unanswered()  # answered: the offset is past it
