"""bench.soak's load: a rig's buffer sheds its oldest fixations and hands out the rest in seq order."""

from __future__ import annotations

import pytest

from bench._rig_load import LoadMinute, Pending, RigBuffer, split_streams
from bench.soak import growth, parse_args


def test_a_full_buffer_sheds_the_oldest_and_keeps_the_newest() -> None:
    buf = RigBuffer(cap=4)
    shed = [buf.produce(Pending(seq, due=0.1 * seq)) for seq in range(10)]
    assert [s.seq for s in shed if s is not None] == [0, 1, 2, 3, 4, 5]  # the oldest, in order
    assert shed[:4] == [None] * 4  # nothing shed until the buffer is full
    assert len(buf) == 4
    assert [p.seq for p in buf.take(100)] == [6, 7, 8, 9]
    assert len(buf) == 0


def test_batches_come_out_in_seq_order_and_capped() -> None:
    buf = RigBuffer(cap=64)
    for seq in range(7):
        buf.produce(Pending(seq, due=float(seq)))
    first = buf.take(3)
    buf.produce(Pending(7, due=7.0))  # produced while the first batch is in flight
    second, third = buf.take(3), buf.take(3)
    assert [p.seq for p in first] == [0, 1, 2]
    assert [p.seq for p in second] == [3, 4, 5]
    assert [p.seq for p in third] == [6, 7]
    assert buf.take(3) == []


def test_shedding_while_a_batch_is_out_keeps_the_next_batch_ordered() -> None:
    buf = RigBuffer(cap=3)
    for seq in range(3):
        buf.produce(Pending(seq, due=float(seq)))
    out = buf.take(2)  # seq 0, 1 in flight
    shed = [buf.produce(Pending(seq, due=float(seq))) for seq in range(3, 7)]
    assert [p.seq for p in out] == [0, 1]
    assert [s.seq for s in shed if s is not None] == [2, 3]
    assert [p.seq for p in buf.take(10)] == [4, 5, 6]  # a gap the server counts, never out of order


def test_a_buffer_needs_room() -> None:
    with pytest.raises(ValueError, match="at least one"):
        RigBuffer(cap=0)


def test_streams_are_dealt_over_the_processes() -> None:
    parts = split_streams(64, 3)
    assert sorted(s for part in parts for s in part) == list(range(64))
    assert [len(p) for p in parts] == [22, 21, 21]
    assert split_streams(2, 4) == [[0], [1]]  # no empty process


def test_minutes_of_processes_merge() -> None:
    a, b = LoadMinute(produced=3, shed=1, latencies=[0.1]), LoadMinute(produced=2, latencies=[0.2])
    a.outcomes["ok"], b.outcomes["ok"], b.outcomes["WorkerTimeout"] = 1, 1, 1
    a.merge(b)
    assert (a.produced, a.shed, a.latencies) == (5, 1, [0.1, 0.2])
    assert a.outcomes == {"ok": 2, "WorkerTimeout": 1}


def test_growth_is_reported_both_ways() -> None:
    g = growth([1000.0, 1100.0, 1105.0, 1111.0], warm_minute=2)
    assert g["issue"] == pytest.approx(0.111)
    assert g["after_warmup"] == pytest.approx(0.01)
    assert growth([1000.0], warm_minute=2) == {"issue": None, "after_warmup": None}


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--buffer", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--server-env", "MALLOC_ARENA_MAX"])
    assert parse_args(["--server-env", "MALLOC_ARENA_MAX=2"]).server_env == {"MALLOC_ARENA_MAX": "2"}
