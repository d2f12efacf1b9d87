"""The re-partition's hand-over (service/handover.py) on a real redis-server, without ranks: which
rank takes which old-shard entry, in what order, and how the old consumer groups move past them.

The old layout has 3 ranks, the new one 2: ``rig-0`` and ``rig-3`` move (old shard 2 to ranks 0 and
1), ``rig-5`` stays on 0 and ``rig-1`` on 1 (``rank_of`` below checks it).
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from service.handover import Handover, OldShard, old_ends
from service.messages import Fixation
from service.shards import rank_of

GROUP = "foveate-workers"
KEYS = [f"foveate:fixations:{r}" for r in range(3)]


def _add(r: redis.Redis, key: str, sid: str, seq: int, entry_id: str = "*") -> str:
    """One fixation entry (its image is not decoded here), at ``entry_id``; its id."""
    eid: Any = r.xadd(key, {"stream_id": sid, "seq": seq, "patch": b"not decoded here"}, id=entry_id)
    return str(eid.decode())


@pytest.fixture
def shards(redis_server: str) -> tuple[redis.Redis, list[OldShard]]:
    """The old shards as a killed 3-rank group left them, with their agreed ends."""
    assert [rank_of(s, 3) for s in ("rig-0", "rig-3", "rig-5", "rig-1")] == [2, 2, 0, 1]
    assert [rank_of(s, 2) for s in ("rig-0", "rig-3", "rig-5", "rig-1")] == [0, 1, 0, 1]
    r = redis.Redis.from_url(redis_server)
    offsets = [
        _add(r, KEYS[k], sid, 0 if k < 2 else 1, f"10-{k}")
        for k, sid in enumerate(("rig-5", "rig-1", "rig-0"))
    ]
    # an API switched to 2 shards wrote rig-0's next fixation into shard 0 after the old ranks
    # stopped, with an id below its old-layout ones in shard 2 (a clock reading of another key)
    _add(r, KEYS[0], "rig-0", 4, "11-0")
    _add(r, KEYS[0], "rig-5", 1, "30-0")
    _add(r, KEYS[1], "rig-1", 1, "30-0")
    _add(r, KEYS[2], "rig-0", 2, "20-0")
    _add(r, KEYS[2], "rig-3", 2, "21-0")
    _add(r, KEYS[2], "rig-1", 9, "22-0")  # neither layout puts rig-1 there
    _add(r, KEYS[2], "rig-0", 3, "23-0")
    _add(r, KEYS[0], "rig-3", 9, "31-0")  # nor rig-3 in shard 0
    # a consumer of the old shard 2 read everything and died before answering
    r.xgroup_create(KEYS[2], GROUP, id="0")
    r.xreadgroup(GROUP, "dead", {KEYS[2]: ">"})
    r.xgroup_create(KEYS[1], GROUP, id="0")  # and one of shard 1 read nothing
    ends = old_ends(r, KEYS)
    return r, [OldShard(k, KEYS[k], offsets[k], ends[k], shared=k < 2) for k in range(3)]


def _queues(handover: Handover) -> dict[str, list[int | None]]:
    return {sid: [f.seq for f in q] for sid, q in handover.queues.items()}


def test_each_rank_takes_its_streams_fixations_in_the_order_written(
    shards: tuple[redis.Redis, list[OldShard]],
) -> None:
    r, old = shards
    decoded: list[Fixation] = []
    zero, one = Handover(old, 3, 2, 0), Handover(old, 3, 2, 1)
    zero.read(r, decoded.append)
    one.read(r, decoded.append)
    # after each writer's offset; an old-layout shard's entries before the new-layout key's
    assert _queues(zero) == {"rig-5": [1], "rig-0": [2, 3, 4]}
    assert _queues(one) == {"rig-1": [1], "rig-3": [2]}
    assert sorted((f.stream_id, f.seq) for f in zero.misrouted) == [("rig-1", 9), ("rig-3", 9)]
    assert one.misrouted == []
    assert zero.switches == {("rig-0", "11-0")}  # where rig-0's ids become another key's
    assert [f.input_key for f in zero.queues["rig-0"]] == [KEYS[2], KEYS[2], KEYS[0]]  # acknowledged there
    assert len(decoded) == zero.held + one.held  # the kept ones only
    assert [(f.stream_id, f.seq) for f in zero.batch(64)] == [("rig-5", 1), ("rig-0", 2)]  # one a stream
    assert [(f.stream_id, f.seq) for f in zero.batch(1)] == [("rig-0", 3)]
    assert [(f.stream_id, f.seq) for f in zero.batch(64)] == [("rig-0", 4)]
    assert zero.batch(64) == [] and zero.held == 0


def test_the_old_groups_move_past_what_was_handed_over(shards: tuple[redis.Redis, list[OldShard]]) -> None:
    r, old = shards
    zero, one = Handover(old, 3, 2, 0), Handover(old, 3, 2, 1)
    assert (zero.resume_after(), one.resume_after()) == (old[0].end, old[1].end)  # shards of both layouts
    assert Handover(old, 3, 4, 3).resume_after() is None  # a new shard: where its group stands
    assert r.xpending(KEYS[2], GROUP)["pending"] == 5
    zero.release(r, GROUP)  # shard 0 (its next reader) and shard 2 (beyond the new world)
    one.release(r, GROUP)
    for k in range(3):
        (info,) = r.xinfo_groups(KEYS[k])
        assert info["last-delivered-id"].decode() == old[k].end
        assert info["pending"] == 0
    _add(r, KEYS[0], "rig-5", 2)  # the next one is all its reader gets
    read: Any = r.xreadgroup(GROUP, "new", {KEYS[0]: ">"})
    (entries,) = read[0][1:]
    assert [e[1][b"seq"] for e in entries] == [b"2"]


def test_a_single_workers_key_is_not_a_shard_of_the_group(redis_server: str) -> None:
    r = redis.Redis.from_url(redis_server)
    first = _add(r, "foveate:fixations", "rig-3", 0)
    _add(r, "foveate:fixations", "rig-3", 1)
    _add(r, "foveate:fixations", "rig-0", 1)
    (end,) = old_ends(r, ["foveate:fixations"])
    old = [OldShard(0, "foveate:fixations", first, end)]
    zero, one = Handover(old, 1, 2, 0), Handover(old, 1, 2, 1)
    zero.read(r, lambda fix: None)
    one.read(r, lambda fix: None)
    assert (_queues(zero), _queues(one)) == ({"rig-0": [1]}, {"rig-3": [1]})
    assert (zero.resume_after(), one.resume_after()) == (None, None)  # their shards are new keys
    zero.release(r, GROUP)  # rank 0 keeps the old key: its group is made at the end
    assert r.xinfo_groups("foveate:fixations")[0]["last-delivered-id"].decode() == end
