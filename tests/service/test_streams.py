"""StreamRecord: error statistics, replay detection by Redis entry id, checkpoint round trip."""

from __future__ import annotations

import math

from service.streams import StreamRecord, entry_key


def test_errors_and_running_mean() -> None:
    rec = StreamRecord("s")
    rec.observe(step=1, error=math.nan, seq=0, t=0.0, entry_id=None)
    assert rec.running_error is None and rec.scored == 0 and rec.fixations == 1
    rec.observe(step=2, error=1.0, seq=1, t=0.2, entry_id=None)
    rec.observe(step=3, error=0.0, seq=2, t=0.4, entry_id=None)
    assert rec.running_error == 0.9  # moving average, weight 0.1 on the newest
    assert rec.mean_error == 0.5 and rec.last_seq == 2 and rec.last_t == 0.4
    assert [e["step"] for e in rec.info()["recent_errors"]] == [2, 3]


def test_replays_are_detected_by_entry_id() -> None:
    rec = StreamRecord("s")
    assert not rec.is_replay("5-0")
    rec.observe(step=1, error=math.nan, seq=None, t=None, entry_id="1000-3")
    assert rec.is_replay("1000-3") and rec.is_replay("999-9")
    assert not rec.is_replay("1000-4") and not rec.is_replay("1001-0")
    assert not rec.is_replay("local-7")  # in-process ids are never compared
    assert entry_key("local-7") is None and entry_key("12-3") == (12, 3)


def test_round_trip() -> None:
    rec = StreamRecord("s")
    rec.observe(step=2, error=0.25, seq=4, t=1.0, entry_id="7-1")
    back = StreamRecord.from_dict(rec.to_dict())
    assert back.info() == rec.info()
