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


def test_records_keep_the_repeat_baseline_through_a_checkpoint_and_read_old_ones() -> None:
    rec = StreamRecord("s")
    rec.observe(step=1, error=math.nan, seq=0, t=None, entry_id=None, repeat_error=math.nan)
    rec.observe(step=2, error=0.25, seq=1, t=None, entry_id=None, repeat_error=0.5, skipped=True)
    rec.observe(step=3, error=0.5, seq=2, t=None, entry_id=None, repeat_error=0.25)
    info = rec.info()
    assert (info["mean_repeat_error"], info["last_repeat_error"], info["skipped"]) == (0.375, 0.25, 1)
    assert info["skill"] == 1 - 0.75 / 0.75
    again = StreamRecord.from_dict(rec.to_dict()).info()
    assert {k: v for k, v in again.items() if k != "updated_at"} == {
        k: v for k, v in info.items() if k != "updated_at"
    }
    # A record saved before repeat errors: recent (step, error) pairs, no repeat sums.
    kept = ("stream_id", "step", "fixations", "scored", "error_sum", "running_error", "last_error")
    old = {k: v for k, v in rec.to_dict().items() if k in kept}
    old["recent"] = [[2, 0.25], [3, 0.5]]
    restored = StreamRecord.from_dict(old).info()
    assert restored["recent_errors"] == [
        {"step": 2, "error": 0.25, "repeat_error": None}, {"step": 3, "error": 0.5, "repeat_error": None}
    ]  # fmt: skip
    assert (restored["mean_error"], restored["mean_repeat_error"], restored["skill"]) == (0.375, None, None)
