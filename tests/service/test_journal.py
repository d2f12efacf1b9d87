"""The command journal (service/journal.py): where a journaled reset or delete is applied again, and
the worker answering them over a real Redis without waiting for a checkpoint.

The bit-for-bit replay after a SIGKILL is in tests/service/test_crash_replay.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from service.config import Settings
from service.journal import CommandJournal
from service.messages import Control, Fixation
from service.redis_broker import RedisBroker
from service.worker import Worker
from tests.service._support import small_settings
from tests.service.test_worker import _reply, _xadd


def _journal(*records: tuple[str, str, str, str]) -> CommandJournal:
    """A journal holding ``records`` (stream, stream_through, input_through, id) to re-apply."""
    journal = CommandJournal()
    journal.take((jid, {"command": "reset", "stream_id": sid, "stream_through": mine, "input_through": seen})
                 for sid, mine, seen, jid in records)  # fmt: skip
    return journal


def _tick(*entries: tuple[str, str]) -> list[Fixation]:
    return [Fixation(sid, entry_id=eid) for sid, eid in entries]


def test_a_record_waits_for_its_streams_place_then_for_the_input() -> None:
    # reset of "a" after a's entry 5-0, when the input had been read up to 6-0
    journal = _journal(("a", "5-0", "6-0", "9-0"))
    assert journal.due_before(_tick(("b", "6-0"))) == []  # not past the input's place yet
    assert journal.due_before(_tick(("a", "5-0"), ("b", "7-0"))) == []  # a's own entry before it goes first
    assert [c.journal_id for c in journal.due_before(_tick(("a", "8-0")))] == ["9-0"]  # a's next entry
    assert journal.pending == []

    journal = _journal(("a", "5-0", "6-0", "9-0"))
    assert [c.stream_id for c in journal.due_before(_tick(("b", "6-1")))] == ["a"]  # past the input's place

    journal = _journal(("a", "5-0", "6-0", "9-0"))
    assert journal.due_after((5, 9)) == [] and journal.due_after(None) == []
    assert [c.stream_id for c in journal.due_after((6, 0))] == ["a"]  # all answered: no fixation after it


def test_records_apply_in_journal_order_and_survive_a_checkpoint() -> None:
    journal = _journal(("a", "5-0", "6-0", "9-0"), ("b", "", "6-0", "9-1"), ("a", "7-0", "8-0", "9-2"))
    due = journal.due_before(_tick(("a", "5-0"), ("b", "8-5")))  # a's entry goes before a's records
    assert [c.journal_id for c in due] == ["9-1"]
    assert [c.journal_id for c in journal.due_before(_tick(("a", "8-1")))] == ["9-0", "9-2"]
    assert journal.through == "9-2" and journal.pending == []

    saved = _journal(("a", "5-0", "6-0", "9-0"), ("b", "", "", "9-1"))
    back = CommandJournal()
    back.load(json.loads(json.dumps(saved.to_dict())))  # what a checkpoint keeps
    assert back.through == "9-1" and back.pending == saved.pending
    assert back.pending[1].stream_through is None
    assert [c.stream_id for c in back.due_after(None)] == ["b"]  # nothing to wait for


@pytest.fixture
def journaling(redis_server: str, tmp_path: Path) -> Iterator[tuple[Worker, redis.Redis]]:
    """A worker over Redis with checkpoints, none due for an hour after the one it takes at start."""
    settings = small_settings(redis_url=redis_server, checkpoint_path=tmp_path / "ckpt.pt", max_batch=1,
                              checkpoint_interval_s=3600)  # fmt: skip
    worker = Worker(settings, RedisBroker(settings))
    worker.start()
    r = redis.Redis.from_url(redis_server)
    for seq in range(2):
        _xadd(r, "a", seq)
    assert [_reply(r, f"a-{seq}")["step"] for seq in range(2)] == [1, 2]
    try:
        yield worker, r
    finally:
        worker.stop()


def _ask(settings: Settings, command: str, **args: Any) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        broker = RedisBroker(settings)
        try:
            return await broker.command(Control(command, args), 30.0)
        finally:
            await broker.close_api()

    return asyncio.run(go())


def test_a_reset_over_redis_is_answered_from_the_journal_with_no_checkpoint(
    journaling: tuple[Worker, redis.Redis],
) -> None:
    worker, r = journaling
    settings = worker.settings
    assert worker.last_checkpoint is not None
    generation = worker.last_checkpoint["generation"]  # the one taken at start
    stages: list[str] = []
    worker.checkpoint_stage = stages.append  # any checkpoint written from now on would show here
    read: Any = r.xrange(settings.input_stream)
    entries = [eid.decode() for eid, _ in read]

    reply = _ask(settings, "reset", stream_id="a")
    assert reply["ok"] and reply["step"] == 0
    assert stages == [] and worker.last_checkpoint["generation"] == generation  # no checkpoint asked
    journal: Any = r.xrange(settings.journal_stream)
    ((_, fields),) = journal
    assert {k.decode(): v.decode() for k, v in fields.items()} == {
        "command": "reset", "stream_id": "a", "stream_through": entries[-1], "input_through": entries[-1]
    }  # fmt: skip

    _xadd(r, "b", 0)
    assert _reply(r, "b-0")["step"] == 1
    assert _ask(settings, "delete", stream_id="b")["deleted"]
    assert stages == [] and r.xlen(settings.journal_stream) == 2

    saved = _ask(settings, "checkpoint")["checkpoint"]  # answered after its commit, which trims
    assert saved["generation"] == generation + 1 and stages[-1] == "commit"
    assert r.xlen(settings.journal_stream) == 0


def test_a_journal_write_redis_refuses_is_an_error_and_nothing_is_applied(
    journaling: tuple[Worker, redis.Redis],
) -> None:
    worker, r = journaling
    settings = worker.settings
    r.set(settings.journal_stream, "not a stream")  # XADD on it fails (WRONGTYPE)

    reply = _ask(settings, "reset", stream_id="a")
    assert not reply["ok"] and reply["error"] == "WorkerUnavailable", reply
    assert "not applied" in reply["detail"]
    stream = worker.execute("stream", {"stream_id": "a"})["stream"]
    assert (stream["step"], stream["resets"], stream["last_seq"]) == (2, 0, 1)  # untouched
    assert _ask(settings, "delete", stream_id="a")["error"] == "WorkerUnavailable"
    assert "a" in worker.records

    r.delete(settings.journal_stream)  # Redis takes writes again: the retry is applied
    assert _ask(settings, "reset", stream_id="a")["step"] == 0
    assert worker.execute("stream", {"stream_id": "a"})["stream"]["resets"] == 1


def test_a_record_whose_entries_are_gone_waits_and_holds_back_new_commands_of_its_stream(
    redis_server: str, tmp_path: Path
) -> None:
    # The reset came after a-1; a-1 is deleted from the input before the restart (as a trim would),
    # so the re-read never reaches the reset's place: it waits, and a new reset of "a" is refused
    # until an entry after its place (of any stream) arrives.
    def worker(name: str) -> Worker:
        settings = small_settings(redis_url=redis_server, checkpoint_path=tmp_path / "ckpt.pt", max_batch=1,
                                  consumer_name=name, checkpoint_interval_s=3600)  # fmt: skip
        return Worker(settings, RedisBroker(settings))

    r = redis.Redis.from_url(redis_server)
    first = worker("w1")
    first.start()
    _xadd(r, "a", 0)
    assert _reply(r, "a-0")["step"] == 1
    first.checkpoint()  # holds a-0
    _xadd(r, "a", 1)
    assert _reply(r, "a-1")["step"] == 2
    assert _ask(first.settings, "reset", stream_id="a")["ok"]
    first.stop(checkpoint=False)  # a crash
    newest: Any = r.xrevrange(first.settings.input_stream, count=1)
    ((last, _),) = newest
    r.xdel(first.settings.input_stream, last)

    second = worker("w2")
    second.start()
    try:
        assert [c.stream_id for c in second.journal.pending] == ["a"]
        refused = _ask(second.settings, "reset", stream_id="a")
        assert refused["error"] == "WorkerUnavailable" and "retry" in refused["detail"], refused
        _xadd(r, "b", 0)  # after the reset's place: the reset is applied before it
        assert _reply(r, "b-0")["step"] == 1
        stream = second.execute("stream", {"stream_id": "a"})["stream"]
        assert (stream["step"], stream["resets"], stream["fixations"]) == (0, 1, 1)
        assert _ask(second.settings, "reset", stream_id="a")["ok"]
    finally:
        second.stop()
