"""The seq rule and the result cache of service/dedup.py."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.dedup import ResultCache, decide, fingerprint


def _result(seq: int, print_: int = 7, error: float | None = 0.5) -> dict[str, Any]:
    return {"seq": seq, "fingerprint": print_, "step": seq + 1, "updates_applied": 10 * seq, "gap": 0,
            "error": error, "repeat_error": None, "running_error": 0.25, "skipped": seq % 2 == 1}  # fmt: skip


def test_cache_keeps_the_last_results_and_survives_a_checkpoint() -> None:
    cache = ResultCache(size=4)
    for seq in range(6):
        cache.put(_result(seq, error=None if seq == 5 else 0.5))
    assert len(cache) == 4 and cache.get(1) is None  # 0 and 1 fell out
    assert cache.get(3) == _result(3) and cache.get(5) == _result(5, error=None)
    again = ResultCache.from_list(cache.to_list(), size=4)
    assert [again.get(s) for s in range(6)] == [cache.get(s) for s in range(6)]
    assert [row[0] for row in again.to_list()] == [2, 3, 4, 5]  # oldest first
    cache.clear()
    assert cache.get(5) is None and cache.to_list() == []


def test_decide() -> None:
    cache = ResultCache()
    cache.put(_result(3, print_=7))
    assert decide(None, cache, 9, 1, False).action == "apply"  # a new stream: any first seq
    assert decide(3, cache, None, 1, False).action == "apply"  # no seq: no de-duplication
    assert (decide(3, cache, 4, 1, False).gap, decide(3, cache, 6, 1, False).gap) == (0, 2)
    dup = decide(3, cache, 3, 7, False)
    assert dup.action == "duplicate" and dup.original == _result(3, print_=7)
    assert decide(3, cache, 3, 7, True).action == "duplicate"  # a retried reset fixation
    assert decide(3, cache, 3, 8, False).action == "reused"  # another image under the same seq
    assert decide(3, cache, 3, 8, True).new_run and decide(3, cache, 1, 8, True).new_run
    assert decide(3, cache, 1, 8, False).action == "late"  # the cache holds every applied seq: 1 never was


def test_a_seq_skipped_by_a_gap_is_late_and_one_older_than_the_cache_already_applied() -> None:
    # applied: 0, 1, 2, then 5, 6, 7 (3 and 4 skipped by a gap); the cache keeps the last 4
    cache = ResultCache(size=4)
    applied = [0, 1, 2, 5, 6, 7]
    for seq in applied[:3]:
        cache.put(_result(seq))
    assert [decide(2, cache, s, 9, False).action for s in (0, 1)] == ["reused", "reused"]
    for seq in applied[3:]:
        cache.put(_result(seq))
    # the cache holds 2, 5, 6, 7: 3 and 4 lie above its oldest and were never applied
    assert [decide(7, cache, s, 9, False).action for s in (3, 4)] == ["late", "late"]
    assert [decide(7, cache, s, 9, False).action for s in (0, 1)] == ["already_applied"] * 2
    assert decide(7, cache, 2, 9, False).action == "reused"  # kept, another image
    assert decide(7, cache, 4, 9, True).new_run  # a reset still starts a new run
    # the same after a checkpoint
    again = ResultCache.from_list(cache.to_list(), size=4)
    assert [decide(7, again, s, 9, False).action for s in (0, 1, 3, 4)] == ["already_applied"] * 2 + [
        "late"
    ] * 2


def test_fingerprint_tells_images_apart() -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[1, 2, 0] = 1
    assert fingerprint(a) == fingerprint(a.copy()) != fingerprint(b)
    assert fingerprint(a) != fingerprint(np.zeros((2, 8, 3), np.uint8))  # same bytes, other shape
