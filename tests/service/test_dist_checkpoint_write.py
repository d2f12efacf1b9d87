"""A distributed worker's checkpoint is a snapshot in the loop, then a write beside it
(service/dist_checkpointer.py), in one process: a gloo group of one rank (a file store), the
in-process broker, a real checkpoint folder.

The writer is held at a stage of its write (``Worker.checkpoint_stage``) until the test has seen
fixations learned meanwhile, so nothing here depends on timing. The checkpoint so written holds the
agreed tick's state: loaded into a fresh learner it equals, bit for bit, a reference worker stopped
after the same fixations. A write that fails commits nothing and answers the command with the error;
a checkpoint asked for during a write is snapshotted only after it (the agreement's ``writing``);
a stop asked for during a write waits for it, then takes the final checkpoint, and ``stop``'s own
checkpoint (outside the loop) is not taken; over a real Redis,
the commit trims the command journal only up to the snapshot's position; and (two spawned ranks) a
rank that dies in its writer's thread makes the other's loop raise ``RankLost``, never hang; and
ranks that see the checkpoint folder differently restore as rank 0 sees it.
(tests/service/test_dist_worker_checkpoint.py covers the command, the stop and the restarts with
real rank processes; tests/learner/test_dist_checkpoint.py the collective write itself.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from learner.checkpoint import MANIFEST, load_checkpoint
from learner.distributed import shared_state
from service.broker import LocalBroker
from service.dist_worker import DistWorker
from service.learner_setup import build_learner
from service.messages import Control, Fixation
from service.worker import Worker
from tests.learner.test_distributed import _assert_same
from tests.service._support import small_settings
from tests.service.test_worker import _fix

BOUND_S = 120  # waiting longer than this is a failure, not a slow machine


@pytest.fixture
def group_of_one(tmp_path: Path) -> Iterator[None]:
    """A gloo group of one rank, and one torch thread from the learners' construction on: a model's
    initialisation (its orthogonal matrices) rounds differently with another number of threads, and
    the reference below must start from the same model as the checkpointed rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    torch.set_num_threads(threads)


class Rank:
    """A started rank-of-one loop on a LocalBroker, and an event loop to submit from."""

    def __init__(self, **settings: Any) -> None:
        # no periodic checkpoint; one torch thread, as the fixture set it
        self.settings = small_settings(checkpoint_interval_s=3600.0, torch_threads=1, **settings)
        self.broker = LocalBroker(self.settings)
        self.worker = DistWorker(self.settings, self.broker)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.broker.start_api())
        self.worker.start(thread=True)

    async def learn(self, fixes: list[Fixation]) -> list[dict[str, Any]]:
        """One fixation at a time, each answered before the next: one learning tick each."""
        out = []
        for fix in fixes:
            await self.broker.submit([fix], wait=True)
            out.append(await self.broker.result(fix.request_id or "", BOUND_S))
        return out

    def close(self) -> None:
        self.worker.stop(checkpoint=False)  # the agreed stop checkpoints (with a path), in the loop
        self.loop.close()


def _first() -> list[Fixation]:
    return [_fix("a", 1), _fix("b", 1), _fix("a", 2)]


def _later() -> list[Fixation]:
    return [_fix("b", 2), _fix("a", 3), _fix("b", 3)]


def _generation(folder: Path) -> int:
    manifest = folder / MANIFEST
    return int(json.loads(manifest.read_text())["generation"]) if manifest.exists() else 0


def _holder(stage_to_hold: str) -> tuple[threading.Event, threading.Event, Callable[[str], None]]:
    """A ``checkpoint_stage`` that holds the writer's thread at ``stage_to_hold`` until released."""
    held, release = threading.Event(), threading.Event()

    def hold(stage: str) -> None:
        if stage == stage_to_hold and not release.is_set():
            held.set()
            assert release.wait(BOUND_S)

    return held, release, hold


def test_learning_goes_on_during_the_write_and_the_checkpoint_holds_the_agreed_tick(
    group_of_one: None, tmp_path: Path
) -> None:
    folder = tmp_path / "foveate.pt"
    run = Rank(checkpoint_path=folder)
    held, release, hold = _holder("rows")  # the snapshot taken, not one file written yet
    try:
        assert [o["step"] for o in run.loop.run_until_complete(run.learn(_first()))] == [1, 1, 2]
        start_generation = _generation(folder)  # the starting point's (taken at start)
        run.worker.checkpoint_stage = hold

        async def go() -> tuple[list[dict[str, Any]], int, int, bool, dict[str, Any]]:
            pending = asyncio.ensure_future(run.broker.command(Control("checkpoint", {}), BOUND_S))
            assert await asyncio.to_thread(held.wait, BOUND_S), "the write never started"
            before = run.worker.learner.updates_applied
            out = await run.learn(_later())  # answered while the writer is held: learned meanwhile
            applied = run.worker.learner.updates_applied - before
            generation, answered_early = _generation(folder), pending.done()
            release.set()
            return out, applied, generation, answered_early, await pending

        out, applied, during, answered_early, reply = run.loop.run_until_complete(go())
        assert [(o["ok"], o["step"]) for o in out] == [(True, 2), (True, 3), (True, 3)]
        assert applied == 3
        assert during == start_generation and not answered_early  # nothing committed, nobody answered
        assert reply["ok"], reply
        assert reply["checkpoint"]["generation"] == _generation(folder) == start_generation + 1
        saved = build_learner(run.settings)
        extra = load_checkpoint(folder, saved)
        records = extra["ranks"][0]["service"]["records"]
        assert (records["a"]["fixations"], records["b"]["fixations"]) == (2, 1)
    finally:
        release.set()
        run.close()
    live = run.worker.learner  # three ticks past the checkpoint
    # the reference: a rank stopped after the same fixations (no checkpoint)
    ref = Rank()
    try:
        ref.loop.run_until_complete(ref.learn(_first()))
    finally:
        ref.close()
    _assert_same(shared_state(saved), shared_state(ref.worker.learner), exact=True)
    assert sorted(saved.stream_ids()) == sorted(ref.worker.learner.stream_ids()) == ["a", "b"]
    for sid in ("a", "b"):
        _assert_same(saved.states.row(sid), ref.worker.learner.states.row(sid), exact=True)
    # and the live learner did move on during the write
    now, then = live.states.row("a"), saved.states.row("a")
    assert any(not torch.equal(now[name], then[name]) for name in then)


def test_a_failed_write_commits_nothing_and_learning_goes_on(group_of_one: None, tmp_path: Path) -> None:
    folder = tmp_path / "foveate.pt"
    run = Rank(checkpoint_path=folder)

    def full_disk(stage: str) -> None:
        if stage == "commit":
            raise OSError(28, "No space left on device")

    try:
        run.loop.run_until_complete(run.learn(_first()))
        before = _generation(folder)
        run.worker.checkpoint_stage = full_disk
        reply = run.loop.run_until_complete(run.broker.command(Control("checkpoint", {}), BOUND_S))
        assert not reply["ok"] and reply["error"] == "CheckpointError", reply
        assert "No space left on device" in reply["detail"]
        assert _generation(folder) == before  # the previous checkpoint stays the committed one
        out = run.loop.run_until_complete(run.learn(_later()))
        assert [o["step"] for o in out] == [2, 3, 3]
        run.worker.checkpoint_stage = None
        reply = run.loop.run_until_complete(run.broker.command(Control("checkpoint", {}), BOUND_S))
        assert reply["ok"] and reply["checkpoint"]["generation"] == _generation(folder) > before
    finally:
        run.close()


def test_a_checkpoint_asked_for_during_a_write_waits_for_its_end(group_of_one: None, tmp_path: Path) -> None:
    """The agreement's ``writing`` flag: a second ``checkpoint`` command that arrives while the first
    write is held takes no snapshot until that write has ended; then it is taken and answered."""
    folder = tmp_path / "foveate.pt"
    run = Rank(checkpoint_path=folder)
    held, release, hold = _holder("rows")
    driver = run.worker.checkpoints
    begun: list[int] = []  # one entry per snapshot the loop begins
    agree, begin = run.worker._agree, driver.begin
    seen = threading.Event()  # two agreements that wanted a checkpoint while one was written, or a begin
    wanting = [0]

    def counting_agree(**flags: bool) -> Any:
        agreed = agree(**flags)
        if flags.get("checkpoint") and agreed.writing and len(begun) == 1:
            wanting[0] += 1
            if wanting[0] >= 2:  # the first one's decision (begin or not) is taken before the second
                seen.set()
        return agreed

    def counting_begin() -> None:
        begun.append(_generation(folder))
        if len(begun) > 1:
            seen.set()
        begin()

    run.worker._agree = counting_agree  # type: ignore[method-assign]
    driver.begin = counting_begin  # type: ignore[method-assign]
    try:
        run.loop.run_until_complete(run.learn(_first()))
        start_generation = _generation(folder)
        run.worker.checkpoint_stage = hold

        async def go() -> tuple[dict[str, Any], dict[str, Any]]:
            first = asyncio.ensure_future(run.broker.command(Control("checkpoint", {}), BOUND_S))
            assert await asyncio.to_thread(held.wait, BOUND_S), "the first write never started"
            second = asyncio.ensure_future(run.broker.command(Control("checkpoint", {}), BOUND_S))
            assert await asyncio.to_thread(seen.wait, BOUND_S), "the loop never asked for the second"
            assert len(begun) == 1, "a second snapshot was begun while the first was written"
            assert not (first.done() or second.done())  # nothing committed yet
            release.set()
            return await first, await second

        one, two = run.loop.run_until_complete(go())
        assert one["ok"] and two["ok"], (one, two)
        assert one["checkpoint"]["generation"] == start_generation + 1
        assert two["checkpoint"]["generation"] == start_generation + 2 == _generation(folder)
        assert len(begun) == 2
    finally:
        release.set()
        run.close()


def test_a_stop_during_a_write_waits_for_it_then_takes_the_final_checkpoint(
    group_of_one: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The held write is released only once the loop, the stop agreed, waits for it in the stop's
    checkpoint: both then commit, in order, and the loop returns."""
    caplog.set_level(logging.INFO, logger="service.dist_worker")
    folder = tmp_path / "foveate.pt"
    run = Rank(checkpoint_path=folder)
    held, release, hold = _holder("commit")
    writer = run.worker.checkpoints.writer
    wait = writer.wait
    loop_waits = threading.Event()  # the loop thread waits for the writer: only the stop's checkpoint

    def watched_wait() -> None:
        if threading.current_thread() is run.worker._thread:
            loop_waits.set()
        wait()

    writer.wait = watched_wait  # type: ignore[method-assign]
    try:
        run.loop.run_until_complete(run.learn(_first()))
        start_generation = _generation(folder)
        run.worker.checkpoint_stage = hold

        async def go() -> dict[str, Any]:
            pending = asyncio.ensure_future(run.broker.command(Control("checkpoint", {}), BOUND_S))
            assert await asyncio.to_thread(held.wait, BOUND_S), "the write never reached its commit"
            run.worker.request_stop()  # agreed at the next iteration, while the write is held
            thread = run.worker._thread
            assert thread is not None
            while not await asyncio.to_thread(loop_waits.wait, 0.1):  # or the loop ended without it
                assert thread.is_alive(), "the loop ended without waiting for the write in flight"
            assert not pending.done() and _generation(folder) == start_generation  # still held
            release.set()
            return await pending

        reply = run.loop.run_until_complete(go())
        assert reply["ok"] and reply["checkpoint"]["generation"] == start_generation + 1
        assert run.worker._thread is not None
        run.worker._thread.join(BOUND_S)  # the loop returns after the stop's checkpoint
        assert not run.worker._thread.is_alive()
        assert "rank 0: the ranks agreed to stop" in caplog.messages  # returned, raised nothing
    finally:
        release.set()
        run.close()
    assert not run.worker.alive
    assert _generation(folder) == start_generation + 2  # the held one committed, then the final one
    assert run.worker.last_checkpoint is not None
    assert run.worker.last_checkpoint["generation"] == start_generation + 2


def test_the_commit_trims_the_journal_to_the_snapshots_position(
    group_of_one: None, redis_server: str, tmp_path: Path
) -> None:
    """Over Redis: a reset journaled while the write is in flight is not in the snapshot, so the
    commit must leave its record; the next checkpoint holds it and trims it."""
    import redis

    from service.redis_broker import RedisBroker
    from tests.service._dist_support import ask_rank
    from tests.service.test_worker import _patch, _reply

    # a group of one reads the keys the API (FOVEATE_SHARDS=1) writes: those of the single worker
    settings = small_settings(redis_url=redis_server, checkpoint_path=tmp_path / "foveate.pt", max_batch=1,
                              checkpoint_interval_s=3600.0, torch_threads=1)  # fmt: skip
    worker = DistWorker(settings, RedisBroker(settings))
    r = redis.Redis.from_url(redis_server)
    held, release, hold = _holder("rows")
    try:
        worker.start(thread=True)
        for seq in range(2):
            fields = {"stream_id": "a", "seq": seq, "raw": _patch(seq).tobytes(), "shape": "32,32,3",
                      "request_id": f"a-{seq}"}  # fmt: skip
            r.xadd(settings.input_stream, fields)  # type: ignore[arg-type]
            assert _reply(r, f"a-{seq}")["step"] == seq + 1
        worker.checkpoint_stage = hold
        replies: list[dict[str, Any]] = []
        asking = threading.Thread(target=lambda: replies.append(ask_rank(redis_server, 1, "checkpoint", 0)))
        asking.start()
        assert held.wait(BOUND_S), "the write never started"
        reset = ask_rank(redis_server, 1, "reset", 0, stream_id="a")  # answered during the write
        assert reset["step"] == 0
        assert r.xlen(settings.journal_stream) == 1
        release.set()
        asking.join(BOUND_S)
        assert replies and replies[0]["checkpoint"]["generation"] >= 1
        assert r.xlen(settings.journal_stream) == 1  # after the snapshot: not trimmed by its commit
        again = ask_rank(redis_server, 1, "checkpoint", 0)["checkpoint"]
        assert again["generation"] == replies[0]["checkpoint"]["generation"] + 1
        assert r.xlen(settings.journal_stream) == 0  # held by this one: trimmed
    finally:
        release.set()
        worker.stop(checkpoint=False)


def lost_writer_rank(rank: int, port: int, out: str) -> None:
    """A spawned rank of a group of two on the in-process broker, checkpointing every 0.3 s beside the
    loop. Rank 1 dies in its writer's thread, its snapshot taken, before its first file; rank 0
    leaves what its loop raised in ``out/rank0.pt`` and exits 0."""
    import os
    import sys
    from datetime import timedelta

    from learner.errors import DistributedError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result: dict[str, Any] = {"rank": rank}
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=300))
    group = dist.new_group(timeout=timedelta(seconds=20))
    slow = dist.new_group(timeout=timedelta(seconds=300))
    settings = small_settings(checkpoint_path=Path(out) / "foveate.pt", checkpoint_interval_s=0.3,
                              torch_threads=1)  # fmt: skip
    worker = DistWorker(settings, LocalBroker(settings), group, checkpoint_group=slow)
    if rank == 1:
        worker.checkpoint_stage = lambda stage: os._exit(3)  # no clean-up: as a killed process
    worker.start(thread=False)
    try:
        worker.run()
        result["returned"] = True
    except DistributedError as exc:
        result["lost"] = f"{type(exc).__name__}: {exc}"
    torch.save(result, Path(out) / f"rank{rank}.pt")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no teardown of a broken gloo group (its destructors can abort)


@pytest.mark.slow
def test_a_rank_lost_during_the_write_ends_the_others_loop(tmp_path: Path) -> None:
    """A rank that dies while the group's checkpoint is written beside the loop makes the others'
    loop raise ``RankLost`` (``foveate worker --distributed`` exits 3 on it), never hang, and
    nothing is committed."""
    from tests.learner import _ranks

    (survivor,) = _ranks.run_ranks(
        lost_writer_rank,
        lambda r, port: (r, port, str(tmp_path)),
        2,
        lambda r: tmp_path / f"rank{r}.pt",
        survivors=1,
        join_bound_s=BOUND_S * 2,
    )
    assert "returned" not in survivor
    assert survivor["lost"].startswith("RankLost:") and "another rank exited" in survivor["lost"]
    assert not (tmp_path / "foveate.pt" / MANIFEST).exists()


def folder_view_rank(rank: int, port: int, out: str) -> None:
    """A spawned rank of a group of two whose checkpoint folder differs from the other's: rank 0's is
    empty, rank 1's holds a single worker's checkpoint (``out/seen``). It restores, then meets the
    other rank once more, and leaves what it restored in ``out/rank<r>.pt``."""
    import os
    from datetime import timedelta

    from learner.distributed import join
    from learner.errors import ConfigError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result: dict[str, Any] = {"rank": rank}
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    group = dist.new_group(timeout=timedelta(seconds=20))
    slow = dist.new_group(timeout=timedelta(seconds=20))
    folder = Path(out) / ("seen" if rank == 1 else "empty") / "foveate.pt"
    settings = small_settings(checkpoint_path=folder, checkpoint_interval_s=3600.0, torch_threads=1)
    try:  # no checkpoint group: its writer would share the loop's group
        DistWorker(settings, LocalBroker(settings), group)
    except ConfigError as exc:
        result["refused"] = str(exc)
    try:
        worker = DistWorker(settings, LocalBroker(settings), group, checkpoint_group=slow)
        worker.sync = join(worker.learner, group)  # as DistWorker.start, before it restores
        result["restored"] = worker.restore()
        dist.barrier(group=group)  # both ranks left the restore's collectives alike
        result["streams"] = sorted(worker.records)
    except Exception as exc:  # a collective that timed out: the ranks entered different ones
        result["error"] = f"{type(exc).__name__}: {exc}"
    torch.save(result, Path(out) / f"rank{rank}.pt")
    os._exit(0)  # no teardown of a gloo group that may be broken


@pytest.mark.slow
def test_rank_0_decides_for_every_rank_whether_there_is_a_checkpoint(tmp_path: Path) -> None:
    """A group of two ranks refuses a DistWorker without a checkpoint group. Rank 1 sees a checkpoint
    where rank 0 sees none (here: another folder): rank 0's view holds on both, so neither enters a
    load the other does not (which would fail the group's collectives at their timeout)."""
    from tests.learner import _ranks

    settings = small_settings(checkpoint_path=tmp_path / "seen" / "foveate.pt", torch_threads=1)
    single = Worker(settings, LocalBroker(settings))
    single.start(thread=False)
    single.checkpoint()
    single.stop(checkpoint=False)
    assert _generation(tmp_path / "seen" / "foveate.pt") == 1

    results = _ranks.run_ranks(
        folder_view_rank,
        lambda r, port: (r, port, str(tmp_path)),
        2,
        lambda r: tmp_path / f"rank{r}.pt",
        join_bound_s=BOUND_S,
    )
    for res in results:
        assert "checkpoint_group" in res.get("refused", ""), res
        assert "error" not in res, res
        assert res["restored"] is False and res["streams"] == []


def test_stop_with_a_checkpoint_takes_none_outside_the_loop(
    group_of_one: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``Worker.stop``'s default (``checkpoint=True``) would take a collective checkpoint on one rank,
    outside the loop: a rank ignores it, with a warning; the agreed stop's own is the last."""
    caplog.set_level(logging.WARNING, logger="service.dist_worker")
    folder = tmp_path / "foveate.pt"
    run = Rank(checkpoint_path=folder)
    try:
        run.loop.run_until_complete(run.learn(_first()))
        before = _generation(folder)
        run.worker.stop()  # the loop agrees the stop and takes the final checkpoint
        assert not run.worker.alive
        assert run.worker.last_checkpoint is not None
        assert _generation(folder) == run.worker.last_checkpoint["generation"] == before + 1
        assert any("takes no checkpoint of its own" in m for m in caplog.messages), caplog.messages
    finally:
        run.loop.close()
