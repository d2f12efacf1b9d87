"""The tick-batching policy alone: one fixation per stream, order kept, bounds on size, wait and memory."""

from __future__ import annotations

from collections import deque

from service.batching import TickBatcher
from service.messages import Control, Fixation


class Inbox:
    """Messages in arrival order, handed out as ``Broker.get`` does; records the waits asked for."""

    def __init__(self, messages: list[Fixation | Control]) -> None:
        self.messages = deque(messages)
        self.waits: list[float] = []

    def get(self, timeout: float) -> Fixation | Control | None:
        self.waits.append(timeout)
        return self.messages.popleft() if self.messages else None


def _fixes(*pairs: tuple[str, int]) -> list[Fixation | Control]:
    return [Fixation(sid, seq=seq) for sid, seq in pairs]


def _ticks(batcher: TickBatcher, inbox: Inbox) -> list[list[tuple[str, int | None]]]:
    ticks = []
    while True:
        batch, _ = batcher.gather(inbox.get)
        if not batch:
            return ticks
        ticks.append([(f.stream_id, f.seq) for f in batch])


def test_one_fixation_per_stream_and_each_stream_in_order() -> None:
    inbox = Inbox(_fixes(("a", 1), ("a", 2), ("b", 1), ("a", 3), ("b", 2), ("c", 1)))
    ticks = _ticks(TickBatcher(max_batch=8, max_wait_s=0.0), inbox)
    assert ticks == [[("a", 1), ("b", 1), ("c", 1)], [("a", 2), ("b", 2)], [("a", 3)]]


def test_held_streams_go_first_and_a_tick_never_exceeds_max_batch() -> None:
    inbox = Inbox(_fixes(("a", 1), ("b", 1), ("b", 2), ("a", 2), ("c", 1), ("d", 1), ("e", 1)))
    ticks = _ticks(TickBatcher(max_batch=3, max_wait_s=0.0), inbox)
    assert all(len(t) <= 3 for t in ticks)
    # b2 and a2 were held back, in that order, and go before the streams still in the inbox
    assert ticks == [[("a", 1), ("b", 1), ("c", 1)], [("b", 2), ("a", 2), ("d", 1)], [("e", 1)]]


def test_a_command_ends_the_tick_and_what_follows_waits() -> None:
    ping = Control("ping")
    inbox = Inbox([*_fixes(("a", 1)), ping, *_fixes(("b", 1))])
    batcher = TickBatcher(max_batch=8, max_wait_s=0.0)
    batch, controls = batcher.gather(inbox.get)
    assert [f.stream_id for f in batch] == ["a"] and controls == [ping]
    batch, controls = batcher.gather(inbox.get)
    assert [f.stream_id for f in batch] == ["b"] and controls == []


def test_one_flooding_stream_stops_the_receiving_at_the_held_cap() -> None:
    inbox = Inbox(_fixes(*(("a", i) for i in range(20))))
    batcher = TickBatcher(max_batch=2, max_wait_s=0.0)
    batch, _ = batcher.gather(inbox.get)
    assert [f.seq for f in batch] == [0]
    assert batcher.held == batcher.held_cap == 8  # 4 * max_batch
    assert len(inbox.messages) == 20 - 1 - 8  # the rest stays in the broker, which bounds it
    assert [t[0][1] for t in _ticks(batcher, inbox)] == list(range(1, 20))  # nothing lost, in order


def test_waits_idle_poll_for_a_first_message_then_at_most_max_wait() -> None:
    inbox = Inbox(_fixes(("a", 1), ("b", 1)))
    batcher = TickBatcher(max_batch=8, max_wait_s=0.25, idle_poll_s=7.0)
    batch, _ = batcher.gather(inbox.get)
    assert len(batch) == 2
    assert inbox.waits[0] == 7.0 and len(inbox.waits) == 3  # the third call found the inbox empty
    assert all(0.0 <= w <= 0.25 for w in inbox.waits[1:])


def test_a_stopping_worker_receives_nothing() -> None:
    inbox = Inbox(_fixes(("a", 1)))
    batch, controls = TickBatcher(max_batch=8, max_wait_s=0.0).gather(inbox.get, stopping=lambda: True)
    assert (batch, controls, inbox.waits) == ([], [], [])
