"""Checkpoints of ``foveate worker --distributed`` end to end: gloo ranks as real processes (started as
torchrun starts them), a real redis-server, the real API on a real uvicorn, one checkpoint folder.

In order, on one Redis and one folder: two ranks learn, a checkpoint command over the API is answered
after the group's commit, SIGTERM stops both with a checkpoint; two new ranks continue every stream
(steps go on, a resent seq is a duplicate, the model is the one saved); then three ranks restart from
the two's checkpoint (every stream once, on its new rank, its steps intact, the fixations queued
when the two were stopped learned by their drain, learning on, and a reset answered from its rank's
command journal, which the stop's checkpoint trims). Going back from 3 ranks to 2, and a
re-partition over entries the old ranks never answered: test_dist_repartition.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from service.shards import rank_of
from tests.service._dist_support import Setup, group_setup, patch
from tests.service._dist_support import stop_group as _stop
from tests.service._support import png, post_patch

pytestmark = pytest.mark.slow  # 2-3 worker processes with torch, restarted 3 times: about 60-90 s

STREAMS = [f"rig-{i}" for i in range(6)]  # both ranks of 2, and all of 3, hold streams
QUEUED = 60  # fixations of one stream (one tick each) in its shard when the group is stopped


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    yield from group_setup(tmp_path_factory, "dist-ckpt")


def test_a_checkpoint_command_is_answered_after_the_commit_and_a_restart_continues(setup: Setup) -> None:
    client = setup.client(2)
    ranks = setup.ranks(2, "first")
    for i in range(3):
        for k, sid in enumerate(STREAMS):
            assert post_patch(client, sid, patch(10 * k + i), seq=i)["step"] == i + 1
    reply = client.post("/v1/model/checkpoint", json={})  # to rank 0, which asks the group
    assert reply.status_code == 200, reply.text
    info = reply.json()  # CheckpointOut
    manifest = json.loads((setup.checkpoint / "manifest.json").read_text())  # committed before the answer
    assert (info["streams"], manifest["ranks"], len(manifest["streams"])) == (6, 2, 6)
    for k, sid in enumerate(STREAMS):  # learned after the checkpoint: the stop's checkpoint holds it
        assert post_patch(client, sid, patch(10 * k + 3), seq=3)["step"] == 4
    saved = setup.fingerprints(2)
    assert len(set(saved)) == 1
    _stop(ranks)

    ranks = setup.ranks(2, "second")
    assert setup.fingerprints(2) == saved  # the model the stop saved, on both ranks
    for k, sid in enumerate(STREAMS):
        again = post_patch(client, sid, patch(10 * k + 3), seq=3)  # a resend: answered, not re-learned
        assert (again["status"], again["step"]) == ("duplicate", 4), again
        assert post_patch(client, sid, patch(10 * k + 4), seq=4)["step"] == 5
    prints = setup.fingerprints(2)
    assert len(set(prints)) == 1 and prints != saved  # learning on, in step
    # queued in a shard as the stop comes: one tick each (one stream), answered by the stop's drain
    pipe = redis.Redis.from_url(setup.redis_url).pipeline()
    for seq in range(5, 5 + QUEUED):
        fields = {"stream_id": STREAMS[0], "seq": seq, "patch": png(patch(seq))}
        pipe.xadd(f"foveate:fixations:{rank_of(STREAMS[0], 2)}", fields)  # type: ignore[arg-type]
    pipe.execute()  # all at once, then at once the signal
    _stop(ranks)


def test_three_ranks_restart_from_two_with_every_stream_once(setup: Setup) -> None:
    ranks = setup.ranks(3, "third")
    client = setup.client(3)
    for rank in range(3):
        held = [s["stream_id"] for s in setup.ask_rank("streams", rank, 3)["streams"]]
        assert sorted(held) == sorted(s for s in STREAMS if rank_of(s, 3) == rank)
    for k, sid in enumerate(STREAMS[1:], start=1):
        assert client.get(f"/v1/streams/{sid}").json()["step"] == 5  # its steps intact
        again = post_patch(client, sid, patch(10 * k + 4), seq=4)  # its dedup record came along
        assert (again["status"], again["step"]) == ("duplicate", 5), again
        assert post_patch(client, sid, patch(10 * k + 5), seq=5)["step"] == 6
    last = 4 + QUEUED  # the fixations queued at the stop were learned before its checkpoint
    assert client.get(f"/v1/streams/{STREAMS[0]}").json()["step"] == last + 1
    again = post_patch(client, STREAMS[0], patch(last), seq=last)
    assert (again["status"], again["step"]) == ("duplicate", last + 1), again
    assert len(set(setup.fingerprints(3))) == 1
    # the new layout was checkpointed at start, before the ranks answered anything new
    assert json.loads((setup.checkpoint / "manifest.json").read_text())["ranks"] == 3
    # a reset over Redis is answered from its rank's command journal, with no checkpoint for it
    before = json.loads((setup.checkpoint / "manifest.json").read_text())["generation"]
    reply = client.post(f"/v1/streams/{STREAMS[1]}/reset", json={})
    assert reply.status_code == 200 and reply.json() == {"stream_id": STREAMS[1], "step": 0}, reply.text
    journal = f"foveate:journal:{rank_of(STREAMS[1], 3)}"
    r = redis.Redis.from_url(setup.redis_url)
    assert [e[1][b"command"] for e in r.xrange(journal)] == [b"reset"]
    assert json.loads((setup.checkpoint / "manifest.json").read_text())["generation"] == before
    _stop(ranks)  # the stop's checkpoint holds the reset: the journal is trimmed
    assert json.loads((setup.checkpoint / "manifest.json").read_text())["generation"] > before
    assert r.xlen(journal) == 0
