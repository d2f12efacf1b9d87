"""The worker with a real (small) learner: batching, order, bad input, commands, checkpoints."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from learner.errors import ArchitectureMismatch
from service import metrics
from service.broker import LocalBroker
from service.errors import PatchError
from service.messages import Control, Fixation
from service.redis_broker import RedisBroker
from service.worker import Worker
from tests.service._support import small_settings


def _patch(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _fix(stream: str, seq: int, **kw: Any) -> Fixation:
    return Fixation(stream, seq=seq, patch=_patch(seq), **kw)


class Running:
    """A started worker thread on a LocalBroker, and a way to submit from an event loop."""

    def __init__(self, **settings: Any) -> None:
        self.settings = small_settings(**settings)
        self.broker = LocalBroker(self.settings)
        self.worker = Worker(self.settings, self.broker)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.broker.start_api())
        self.worker.start()

    def send(self, fixes: list[Fixation]) -> list[dict[str, Any]]:
        async def go() -> list[dict[str, Any]]:
            await self.broker.submit(fixes, wait=True)
            return [await self.broker.result(f.request_id or "", 30.0) for f in fixes]

        return self.loop.run_until_complete(go())

    def send_as_redis(self, fix: Fixation, entry_id: str) -> dict[str, Any]:
        """Deliver a fixation as if read from Redis (LocalBroker.submit would number it itself)."""

        async def go() -> dict[str, Any]:
            fix.request_id, fix.entry_id = f"req-{entry_id}", entry_id
            self.broker._expect(fix.request_id)
            self.broker.inbox.put_fixation(fix)
            return await self.broker.result(fix.request_id, 30.0)

        return self.loop.run_until_complete(go())

    def command(self, name: str, **args: Any) -> dict[str, Any]:
        return self.loop.run_until_complete(self.broker.command(Control(name, args), 30.0))

    def close(self) -> None:
        self.worker.stop()
        self.loop.close()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    run = Running(checkpoint_path=tmp_path / "ckpt.pt", max_streams=3)
    yield run
    run.close()


def test_gather_takes_one_fixation_per_stream_in_order() -> None:
    settings = small_settings(max_batch=8, max_wait_ms=0.0)
    broker = LocalBroker(settings)
    worker = Worker(settings, broker)
    for fix in [_fix("a", 1), _fix("a", 2), _fix("b", 1), _fix("a", 3), _fix("b", 2), _fix("c", 1)]:
        broker.inbox.put_fixation(fix)
    ticks = []
    while True:
        batch, _ = worker.batcher.gather(worker._receive)
        if not batch:
            break
        ticks.append([(f.stream_id, f.seq) for f in batch])
    assert ticks == [[("a", 1), ("b", 1), ("c", 1)], [("a", 2), ("b", 2)], [("a", 3)]]


def test_streams_learn_in_order_and_bad_input_is_isolated(running: Running) -> None:
    updates0 = metrics.UPDATES._value.get()  # type: ignore[attr-defined]
    bad = Fixation("b", seq=1, problem=PatchError("cannot decode image"))
    out = running.send([_fix("a", 1), _fix("a", 2), bad, _fix("b", 2), _fix("a", 3), _fix("b", 3)])
    a = [o for o in out if o.get("stream_id") == "a"]
    assert [o["step"] for o in a] == [1, 2, 3] and [o["seq"] for o in a] == [1, 2, 3]
    assert a[0]["error"] is None and all(0.0 <= o["error"] < math.inf for o in a[1:])
    assert out[2] == {"ok": False, "error": "PatchError", "detail": "cannot decode image"}
    assert [o["step"] for o in (out[3], out[5])] == [1, 2]  # stream b was unaffected by its bad message
    # The first scored fixations of a fresh model are too ill-conditioned to learn from (skipped);
    # every tick with a scored fixation that was not skipped applies an update.
    learned = [o for o in out if o.get("ok") and o["error"] is not None and not o["skipped"]]
    assert learned and out[-1]["updates_applied"] >= 1
    assert metrics.UPDATES._value.get() > updates0  # type: ignore[attr-defined]
    assert running.worker.alive


def test_commands(running: Running) -> None:
    running.send([_fix("a", 1), _fix("a", 2, return_prediction=True)])
    info = running.command("stream", stream_id="a")["stream"]
    assert (info["step"], info["fixations"], info["last_seq"], info["state"]["step"]) == (2, 2, 2, 2)
    pred = running.command("prediction", stream_id="a")
    assert len(pred["prediction"]) == running.settings.embed_dim
    assert running.command("reset", stream_id="a") == {"ok": True, "stream_id": "a", "step": 0}
    assert running.send([_fix("a", 3)])[0]["step"] == 1
    assert running.command("streams")["count"] == 1
    assert running.command("delete", stream_id="a")["deleted"] is True
    gone = running.command("stream", stream_id="a")
    assert gone["ok"] is False and gone["error"] == "UnknownStream"
    model = running.command("model")["model"]
    assert model["config"]["n_units"] == 64 and model["parameters"]["rgc"] > 0
    assert running.command("nonsense")["error"] == "InputError"


def test_too_many_streams_and_redeliveries_are_refused(running: Running) -> None:
    out = running.send([_fix(s, 1) for s in ("a", "b", "c", "d")])
    assert [o["ok"] for o in out] == [True, True, True, False]
    assert out[3]["error"] == "TooManyStreams"
    first = running.send_as_redis(_fix("a", 2), "1700000000000-5")
    again = running.send_as_redis(_fix("a", 2), "1700000000000-5")  # the same Redis entry, re-delivered
    assert first["status"] == "applied" and again["status"] == "duplicate"
    assert {k: v for k, v in again.items() if k not in ("status", "request_id")} == {
        k: v for k, v in first.items() if k not in ("status", "request_id")
    }
    # without seq, a re-delivered entry is recognised by its entry id alone
    running.send_as_redis(Fixation("a", patch=_patch(7)), "1700000000000-6")
    late = running.send_as_redis(Fixation("a", patch=_patch(7)), "1700000000000-6")
    assert late["status"] == "already_applied" and late["step"] is None
    assert running.command("stream", stream_id="a")["stream"]["step"] == 3  # none applied twice


def _same_result(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {k: v for k, v in a.items() if k not in ("status", "request_id")} == {
        k: v for k, v in b.items() if k not in ("status", "request_id")
    }


def test_seq_rule_resets_new_runs_and_reuse(running: Running) -> None:
    first = running.send([_fix("a", 0), _fix("a", 1), _fix("a", 2, return_prediction=True)])
    retry = running.send([_fix("a", 2, return_prediction=True)])[0]
    assert retry["status"] == "duplicate" and _same_result(retry, first[2])  # the prediction too
    # another image under a seq already applied, without a reset: the client's numbering is broken
    reused = running.send([Fixation("a", seq=1, patch=_patch(99))])[0]
    assert reused["ok"] is False and reused["error"] == "InputError" and "already applied" in reused["detail"]
    # the reset route forgets the numbering: seq 0 is applied again, even with the same image
    running.command("reset", stream_id="a")
    again = running.send([_fix("a", 0), _fix("a", 1)])
    assert [(o["status"], o["step"]) for o in again] == [("applied", 1), ("applied", 2)]
    # a new run (a restarted client numbering from 0) sends reset=true with a new image: applied
    new_run = running.send([Fixation("a", seq=0, patch=_patch(50), reset=True), _fix("a", 1)])
    assert [(o["status"], o["step"], o["gap"]) for o in new_run] == [("applied", 1, 0), ("applied", 2, 0)]
    # ... and a retry of the reset fixation itself is a duplicate
    assert running.send([Fixation("a", seq=0, patch=_patch(50), reset=True)])[0]["status"] == "duplicate"
    assert running.command("stream", stream_id="a")["stream"]["fixations"] == 7


def test_old_duplicates_are_answered_already_applied(running: Running) -> None:
    from service.dedup import CACHE_SIZE

    out = running.send([_fix("a", seq) for seq in range(CACHE_SIZE + 2)])
    updates = out[-1]["updates_applied"]
    old, recent = running.send([_fix("a", 0), _fix("a", 2)])
    assert old["status"] == "already_applied" and old["step"] is None and old["error"] is None
    assert old["updates_applied"] == updates  # nothing applied
    assert recent["status"] == "duplicate" and _same_result(recent, out[2])
    assert running.command("stream", stream_id="a")["stream"]["fixations"] == CACHE_SIZE + 2


def test_checkpoint_restores_steps_and_updates(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    first = Running(checkpoint_path=ckpt)
    out = first.send([_fix("a", 1), _fix("a", 2), _fix("a", 3)])
    updates = out[-1]["updates_applied"]
    first.close()  # a graceful stop writes the checkpoint
    assert ckpt.exists()

    second = Running(checkpoint_path=ckpt)
    try:
        assert second.worker.learner.updates_applied == updates
        retry = second.send([_fix("a", 2)])[0]  # the seq and the results came back with the checkpoint
        assert retry["status"] == "duplicate" and _same_result(retry, out[1])
        nxt = second.send([_fix("a", 4)])[0]
        assert nxt["step"] == 4 and nxt["updates_applied"] == updates + 1
        info = second.command("stream", stream_id="a")["stream"]
        assert info["fixations"] == 4 and info["last_seq"] == 4
        assert second.command("model")["model"]["last_checkpoint"]["updates_applied"] == updates
    finally:
        second.close()


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    Running(checkpoint_path=ckpt).close()
    settings = small_settings(checkpoint_path=ckpt, n_units=48)
    worker = Worker(settings, LocalBroker(settings))
    with pytest.raises(ArchitectureMismatch, match="n_units"):
        worker.start()


def test_a_deleted_stream_is_not_brought_back_by_a_redelivery(running: Running) -> None:
    running.send_as_redis(_fix("a", 1), "1700000000000-5")
    running.command("delete", stream_id="a")
    late = running.send_as_redis(_fix("a", 1), "1700000000000-5")  # re-read after a restart
    assert late["status"] == "already_applied"
    assert running.command("stream", stream_id="a")["error"] == "UnknownStream"
    assert running.send_as_redis(_fix("a", 1), "1700000000000-7")["step"] == 1  # a new entry: a new stream


def _xadd(r: redis.Redis, stream: str, seq: int) -> None:
    fields = {"stream_id": stream, "seq": seq, "raw": _patch(seq).tobytes(), "shape": "32,32,3",
              "request_id": f"{stream}-{seq}"}  # fmt: skip
    r.xadd("foveate:fixations", fields)  # type: ignore[arg-type]


def _reply(r: redis.Redis, request_id: str) -> dict[str, Any]:
    item = r.blpop([f"foveate:result:{request_id}"], timeout=60)
    assert item is not None, request_id
    return dict(json.loads(item[1]))


def test_reset_command_survives_a_crash(redis_server: str, tmp_path: Path) -> None:
    # A reset is not in the input stream, so re-reading it after a crash cannot repeat it: the
    # worker writes it to the command journal, and the restarted worker applies it again after a-2.
    def worker(name: str) -> Worker:
        settings = small_settings(redis_url=redis_server, checkpoint_path=tmp_path / "ckpt.pt", max_batch=1,
                                  consumer_name=name, checkpoint_interval_s=3600)  # fmt: skip
        return Worker(settings, RedisBroker(settings))

    r = redis.Redis.from_url(redis_server)
    first = worker("w1")
    first.start()
    for seq in range(3):
        _xadd(r, "a", seq)
    assert [_reply(r, f"a-{seq}")["step"] for seq in range(3)] == [1, 2, 3]
    api = RedisBroker(first.settings)
    r.set(first.settings.heartbeat_key, json.dumps({"ts": time.time()}))
    assert asyncio.run(api.command(Control("reset", {"stream_id": "a"}), 30.0))["step"] == 0
    _xadd(r, "a", 3)
    assert _reply(r, "a-3")["step"] == 1
    first.stop(checkpoint=False)  # a crash: what is not in a checkpoint is lost

    second = worker("w2")
    second.start()
    try:
        assert _reply(r, "a-3")["step"] == 1  # re-read (after the reset's checkpoint) and applied again
        assert second.execute("stream", {"stream_id": "a"})["stream"]["fixations"] == 4
    finally:
        second.stop()


def test_a_full_state_memory_refuses_new_streams_until_one_is_deleted() -> None:
    run = Running()  # no checkpoint path: nowhere to spill
    try:
        learner = run.worker.learner
        learner.limit_memory(2 * learner.memory_per_stream())
        out = run.send([_fix("a", 1), _fix("b", 1), _fix("c", 1)])
        assert [o["ok"] for o in out] == [True, True, False]
        assert out[2]["error"] == "TooManyStreams" and "FOVEATE_MAX_STATE_MB" in out[2]["detail"]
        run.command("delete", stream_id="a")
        assert run.send([_fix("c", 1)])[0]["ok"]
    finally:
        run.close()


def test_idle_streams_spill_and_come_back(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    run = Running(checkpoint_path=path)
    learner = run.worker.learner
    learner.limit_memory(2 * learner.memory_per_stream(), path.with_name("ckpt.pt.spill"))
    for seq in (1, 2):
        assert all(o["ok"] for o in run.send([_fix(s, seq) for s in ("a", "b", "c", "d")]))
    assert learner.states.resident == 2 and learner.states.spilled == 2
    assert run.command("stream", stream_id="a")["stream"]["state"]["step"] == 2  # read back from disk
    run.close()  # checkpoints every stream, spilled or not
    again = Running(checkpoint_path=path)
    try:
        assert sorted(again.worker.learner.stream_ids()) == ["a", "b", "c", "d"]
        assert [o["step"] for o in again.send([_fix(s, 3) for s in ("a", "b", "c", "d")])] == [3, 3, 3, 3]
    finally:
        again.close()
