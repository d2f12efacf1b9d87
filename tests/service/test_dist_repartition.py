"""Re-partitions of ``foveate worker --distributed`` end to end: gloo ranks as real processes (started as
torchrun starts them), a real redis-server, the real API on a real uvicorn, one checkpoint folder.

In order, on one Redis and one folder:

1. three ranks learn and are stopped with SIGTERM; two ranks restart from their checkpoint: the
   checkpoint the two commit at start holds every stream once with its rows, the shared state and its
   record bit for bit as the three saved them (a stream that changed keys forgets its last entry ids,
   no more); a resent seq is a duplicate and the group learns on;
2. three ranks restart from the two, checkpoint, learn more, and are killed (SIGKILL); fixations then
   arrive in their shards (and, for streams that move, in the shards the two-rank layout gives them, as
   an API already switched would write them); two ranks restart and hand every one over: each is
   answered once, each stream's in seq order, and the states equal one learner that restored the
   three's checkpoint and ticked the same fixations, a tick holding every stream's next one;
3. a reset journaled after the checkpoint cannot be placed among another layout's entries: a
   re-partition is refused, naming the journal.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch

from learner.checkpoint import load_checkpoint, read_state, save_checkpoint
from service.learner_setup import build_learner
from service.shards import rank_of
from tests.service._dist_support import BOUND_S, Setup, group_setup, patch, stop_group
from tests.service._support import png, post_patch, small_settings

pytestmark = pytest.mark.slow  # five groups of 2-3 worker processes with torch: about 2-3 minutes

STREAMS = [f"rig-{i}" for i in range(6)]  # rig-0 and rig-3 change keys from 3 ranks to 2
HANDED = ["rig-0", "rig-1", "rig-3", "rig-5"]  # with fixations after the checkpoint in step 2
MOVED = [s for s in HANDED if rank_of(s, 3) != rank_of(s, 2)]  # get new-layout entries too


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    yield from group_setup(tmp_path_factory, "dist-repartition")


def _committed(setup: Setup, world: int, after: int = -1) -> dict[str, Any]:
    """The checkpoint, once ``world`` ranks have committed one of a generation above ``after``."""
    deadline = time.monotonic() + BOUND_S
    manifest = setup.checkpoint / "manifest.json"
    while True:
        if manifest.exists():
            saved = json.loads(manifest.read_text())
            if saved.get("ranks") == world and saved["generation"] > after:
                return read_state(setup.checkpoint)
        assert time.monotonic() < deadline, f"no checkpoint of {world} ranks within {BOUND_S} s"
        time.sleep(0.1)


def _records(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every stream's record, from whichever writer held it."""
    out: dict[str, dict[str, Any]] = {}
    for writer in state["extra"]["ranks"]:
        for sid, rec in writer["service"]["records"].items():
            assert sid not in out, f"stream {sid} has two records"
            out[sid] = rec
    return out


def _same(a: Any, b: Any, *, exact: bool, where: str = "") -> None:
    """Nested dicts, lists and tensors equal: bit for bit (``exact``) or to float tolerance."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {a.keys()} != {b.keys()}"
        for k in a:
            _same(a[k], b[k], exact=exact, where=f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, exact=exact, where=f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        if exact or not a.is_floating_point():
            assert a.dtype == b.dtype and torch.equal(a, b), where
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, equal_nan=True, msg=where)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _shared(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's shared state, with each whitening's pending rows as what they add to its
    covariance: a group observes a tick's rows rank by rank, so they wait in another order than
    one learner's (learner/model.py ``covariance``)."""

    def pending(extra: dict[str, torch.Tensor]) -> dict[str, Any]:
        rows = extra["rows"].double()  # (k, F)
        weights = extra["coef"] * extra["decay"]  # (k,)
        return {"gram": (rows * weights[:, None]).T @ rows, "k": rows.shape[0], "decay": extra["decay"]}

    shared = {k: v for k, v in state.items() if k != "streams"}
    weights = {k: pending(v) if k.endswith("_extra_state") else v for k, v in shared["weights"].items()}
    return {**shared, "weights": weights}


def test_three_ranks_go_back_to_two_with_every_stream_bit_for_bit(setup: Setup) -> None:
    client = setup.client(3)
    ranks = setup.ranks(3, "three")
    for i in range(3):
        for k, sid in enumerate(STREAMS):
            assert post_patch(client, sid, patch(10 * k + i), seq=i)["step"] == i + 1
    stop_group(ranks)
    before = read_state(setup.checkpoint)
    assert before["manifest"]["ranks"] == 3

    ranks = setup.ranks(2, "two")
    after = _committed(setup, 2)  # committed at start, before anything new is answered
    assert sorted(after["state"]["streams"]) == sorted(STREAMS)  # every stream, once (the manifest)
    _same(before["state"], after["state"], exact=True, where="state")
    old, new = _records(before), _records(after)
    assert sorted(new) == sorted(STREAMS)
    for sid in STREAMS:
        if rank_of(sid, 3) != rank_of(sid, 2):  # another key: its ids there order nothing here
            assert new[sid]["last_entry_id"] is None and new[sid]["last_read_entry_id"] is None
            new[sid] = {**new[sid], "last_entry_id": old[sid]["last_entry_id"],
                        "last_read_entry_id": old[sid]["last_read_entry_id"]}  # fmt: skip
        _same(new[sid], old[sid], exact=True, where=sid)

    client = setup.client(2)
    for rank in range(2):
        held = [s["stream_id"] for s in setup.ask_rank("streams", rank, 2)["streams"]]
        assert sorted(held) == sorted(s for s in STREAMS if rank_of(s, 2) == rank)
    for k, sid in enumerate(STREAMS):
        again = post_patch(client, sid, patch(10 * k + 2), seq=2)  # its dedup record came along
        assert (again["status"], again["step"]) == ("duplicate", 3), again
        assert post_patch(client, sid, patch(10 * k + 3), seq=3)["step"] == 4
    prints = setup.fingerprints(2)
    assert len(set(prints)) == 1
    stop_group(ranks)


def _image(sid: str, seq: int) -> np.ndarray:
    return patch(1000 + 100 * STREAMS.index(sid) + seq)


def _reference(base: Path, out: Path, plan: dict[str, list[int]]) -> dict[str, Any]:
    """One learner restored from ``base`` that ticks ``plan`` (stream -> seqs), tick ``i`` holding
    every stream's ``i``-th fixation; its state as a checkpoint holds it."""
    learner = build_learner(small_settings())
    load_checkpoint(base, learner)
    for i in range(max(len(seqs) for seqs in plan.values())):
        ids = [sid for sid, seqs in plan.items() if i < len(seqs)]
        learner.tick(ids, np.stack([_image(sid, plan[sid][i]) for sid in ids]))  # (B, P, P, 3)
    save_checkpoint(out, learner)
    return read_state(out)


def test_a_killed_group_hands_its_unanswered_fixations_to_the_new_ranks(setup: Setup) -> None:
    r = redis.Redis.from_url(setup.redis_url)
    ranks = setup.ranks(3, "killed")
    client = setup.client(3)
    reply = client.post("/v1/model/checkpoint", json={})
    assert reply.status_code == 200, reply.text
    base = setup.tmp / "base"
    shutil.copytree(setup.checkpoint, base)  # what the three committed
    at = {sid: client.get(f"/v1/streams/{sid}").json()["step"] for sid in HANDED}
    plan: dict[str, list[int]] = {sid: [] for sid in HANDED}
    for sid in HANDED:  # learned after the checkpoint: lost with the killed ranks
        for seq in (4, 5):
            assert post_patch(client, sid, _image(sid, seq), seq=seq)["status"] == "applied"
            plan[sid].append(seq)
    for proc in ranks:
        proc.process.kill()
        proc.process.wait(timeout=BOUND_S)
    queued: dict[str, tuple[str, int]] = {}  # request id -> (stream, seq)
    pipe = r.pipeline()

    def queue(sid: str, seq: int, world: int) -> None:  # into the stream's shard of ``world`` ranks
        queued[f"q-{sid}-{seq}"] = (sid, seq)
        fields = {
            "stream_id": sid,
            "seq": seq,
            "patch": png(_image(sid, seq)),
            "request_id": f"q-{sid}-{seq}",
        }
        pipe.xadd(f"foveate:fixations:{rank_of(sid, world)}", fields)  # type: ignore[arg-type]
        plan[sid].append(seq)

    for sid in HANDED:  # never read: the three's shards
        for seq in (6, 7, 8):
            queue(sid, seq, 3)
    for sid in MOVED:  # as an API switched to two shards writes them, before the two start
        for seq in (9, 10):
            queue(sid, seq, 2)
    pipe.execute()
    generation = json.loads((setup.checkpoint / "manifest.json").read_text())["generation"]

    ranks = setup.ranks(2, "handed")
    after = _committed(setup, 2, after=generation)  # the hand-over's effect, committed at start
    entries: Any = r.xrange("foveate:results")
    results = [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries]
    answers: dict[str, list[dict[str, str]]] = {}
    for res in results:
        if res.get("request_id") in queued:
            answers.setdefault(res["request_id"], []).append(res)
    assert sorted(answers) == sorted(queued)
    for request, (_, seq) in queued.items():  # once each, learned
        assert len(answers[request]) == 1, answers[request]
        assert (answers[request][0]["status"], answers[request][0]["seq"]) == ("applied", str(seq))
    for sid in HANDED:  # each stream's in seq order
        order = [int(res["seq"]) for res in results if res.get("request_id", "").startswith(f"q-{sid}-")]
        assert order == [seq for seq in plan[sid] if seq >= 6], (sid, order)

    reference = _reference(base, setup.tmp / "reference", plan)
    streams, expected = after["state"]["streams"], reference["state"]["streams"]
    assert sorted(streams) == sorted(STREAMS)
    _same(expected, streams, exact=False, where="streams")  # the others untouched: exactly as saved
    _same(_shared(reference["state"]), _shared(after["state"]), exact=False, where="shared")
    client = setup.client(2)
    for sid in HANDED:
        assert client.get(f"/v1/streams/{sid}").json()["step"] == at[sid] + len(plan[sid])
    sid = MOVED[0]
    again = post_patch(client, sid, _image(sid, 8), seq=8)  # a handed-over fixation, resent
    assert (again["status"], again["step"]) == ("duplicate", at[sid] + 5), again
    assert post_patch(client, sid, _image(sid, 11), seq=11)["status"] == "applied"
    assert len(set(setup.fingerprints(2))) == 1
    stop_group(ranks)


def test_a_reset_journaled_after_the_checkpoint_refuses_a_repartition(setup: Setup) -> None:
    r = redis.Redis.from_url(setup.redis_url)
    sid = next(s for s in STREAMS if rank_of(s, 2) == 1)
    record: Any = {"command": "reset", "stream_id": sid, "stream_through": "", "input_through": ""}
    r.xadd("foveate:journal:1", record)  # as a rank killed after journaling it leaves it
    ranks = setup.ranks(3, "refused", wait=False)
    for proc in ranks:
        assert proc.process.wait(timeout=BOUND_S) != 0, proc.tail()
    log = ranks[0].log.read_text()
    assert "the command journal foveate:journal:1 holds resets or deletes after the checkpoint" in log
    assert "restart with WORLD_SIZE=2" in log
