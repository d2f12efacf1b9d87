"""The repeat baseline's metrics: its error histogram and summary, the skill gauge's sliding windows,
the skipped-fixation counter and the trace spectral radius, read back from the exposition."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from learner.streaming import TickOutput
from service import metrics, running_stats
from service.admission import Accepted as _Accepted
from service.broker import LocalBroker
from service.dedup import APPLY
from service.messages import Fixation
from service.worker import Worker
from tests.service._support import small_settings

Key = tuple[str, tuple[tuple[str, str], ...]]


def _samples() -> dict[Key, float]:
    text = metrics.render("worker").decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")  # a timestamp
    }


def _delta(new: dict[Key, float], old: dict[Key, float], prefix: str) -> dict[Key, float]:
    return {k: v - old.get(k, 0.0) for k, v in new.items() if k[0].startswith(prefix)}


def _skill(samples: dict[Key, float], step: str) -> float:
    return samples[("foveate_prediction_skill", (("step", step),))]


@pytest.fixture
def fresh_windows(monkeypatch: pytest.MonkeyPatch) -> Iterator[running_stats.SkillWindows]:
    """Skill windows of 3 fixations, empty: other tests of this process fed the module's own."""
    windows = running_stats.SkillWindows(size=3)
    monkeypatch.setattr(metrics, "_SKILL", windows)
    yield windows


def test_repeat_errors_and_skill_reach_the_exposition(fresh_windows: running_stats.SkillWindows) -> None:
    before = _samples()
    steps = [1, 2, 2, 3, 25]
    errors = [math.nan, 0.25, 0.5, 0.25, 0.125]
    repeats = [math.nan, 0.5, 0.5, 0.5, 0.0625]
    metrics.observe_errors(steps, errors, repeats)
    after = _samples()
    rep = _delta(after, before, "foveate_repeat_error")
    assert rep[("foveate_repeat_error_count", ())] == 4  # the unscored fixation is not observed
    assert rep[("foveate_repeat_error_sum", ())] == pytest.approx(1.5625)
    assert rep[("foveate_repeat_error_bucket", (("le", "0.1"),))] == 1  # same buckets as the model's
    by_step = _delta(after, before, "foveate_step_repeat_error")
    assert by_step[("foveate_step_repeat_error_count", (("step", "2"),))] == 2
    assert by_step[("foveate_step_repeat_error_sum", (("step", "2"),))] == 1.0
    assert by_step[("foveate_step_repeat_error_sum", (("step", "20+"),))] == 0.0625  # bounded labels
    # skill = 1 - sum(model errors) / sum(repeat errors) in each step label's window
    assert _skill(after, "2") == pytest.approx(1 - 0.75 / 1.0)
    assert _skill(after, "3") == pytest.approx(0.5)
    assert _skill(after, "20+") == pytest.approx(-1.0)  # worse than repeating
    # "all" is its own window of the last 3 scored fixations of any step
    assert _skill(after, metrics.ALL_STEPS) == pytest.approx(1 - (0.5 + 0.25 + 0.125) / (0.5 + 0.5 + 0.0625))
    assert ("foveate_prediction_skill", (("step", "1"),)) not in after  # step 1 is never scored

    # The window slides: step 2 keeps only its last 3 fixations.
    metrics.observe_errors([2, 2], [0.125, 0.375], [0.25, 0.25])
    assert _skill(_samples(), "2") == pytest.approx(1 - (0.5 + 0.125 + 0.375) / (0.5 + 0.25 + 0.25))
    assert fresh_windows.count("2") == 3


def test_without_repeat_errors_only_the_model_is_observed(fresh_windows: running_stats.SkillWindows) -> None:
    before = _samples()
    metrics.observe_errors([4, 5], [0.5, 0.25])
    after = _samples()
    assert _delta(after, before, "foveate_prediction_error")[("foveate_prediction_error_count", ())] == 2
    assert not any(_delta(after, before, "foveate_repeat_error").values())
    assert fresh_windows.count("4") == fresh_windows.count(metrics.ALL_STEPS) == 0
    with pytest.raises(ValueError, match="repeat errors"):
        metrics.observe_errors([4, 5], [0.5, 0.25], [0.5])


def test_skill_windows_stay_exact_and_bounded() -> None:
    windows = running_stats.SkillWindows(size=4)
    rng = np.random.default_rng(0)
    pairs = [(float(e), float(r)) for e, r in rng.uniform(0.0, 1.0, (1001, 2))]
    for i in range(0, len(pairs), 7):
        got = windows.add_many("2", pairs[i : i + 7])
    last = pairs[-4:]
    assert windows.count("2") == 4
    assert got == pytest.approx(1 - sum(e for e, _ in last) / sum(r for _, r in last), rel=1e-12)
    # a window whose repeat errors sum to 0 has no skill (NaN), and so does a fixation's
    assert math.isnan(windows.add_many("3", [(0.0, 0.0)]))
    assert math.isnan(running_stats.skill(0.5, 0.0)) and math.isnan(running_stats.skill(0.5, math.nan))
    assert running_stats.skill(0.25, 0.5) == 0.5
    assert metrics.SKILL_WINDOW == metrics._SKILL.size == 1000


class _StubLearner:
    """What Worker._apply asks of a learner, answering one prepared TickOutput."""

    updates_applied = 0

    def __init__(self, out: TickOutput) -> None:
        self.out = out

    def tick(self, ids: list[str], patches: Any, reset: list[bool]) -> TickOutput:
        assert ids == self.out.stream_ids
        return self.out

    def limit_memory(self, max_bytes: int, spill_dir: Any = None) -> int:
        return 1_000


def test_a_tick_output_becomes_replies_and_metrics(fresh_windows: running_stats.SkillWindows) -> None:
    nan = math.nan
    out = TickOutput(
        stream_ids=["s-a", "s-b", "s-c"],
        step=torch.tensor([1, 2, 7]),
        error=torch.tensor([nan, 0.25, 0.125]),
        prediction=torch.zeros(3, 4),
        updated=False,
        repeat_error=torch.tensor([nan, 0.5, 0.0625]),
        skipped=torch.tensor([False, True, False]),
        trace_radius=1.25,
    )
    settings = small_settings()
    worker = Worker(settings, LocalBroker(settings), learner=_StubLearner(out))  # type: ignore[arg-type]
    patch = np.zeros((32, 32, 3), np.uint8)
    before = _samples()
    fixes = [_Accepted(Fixation(s, patch=patch), APPLY, 0) for s in out.stream_ids]
    replies = [payload for _, payload in worker._apply(fixes)]
    after = _samples()
    scores = [{k: r[k] for k in ("error", "repeat_error", "skill", "skipped")} for r in replies]
    assert scores == [
        {"error": None, "repeat_error": None, "skill": None, "skipped": False},
        {"error": 0.25, "repeat_error": 0.5, "skill": 0.5, "skipped": True},
        {"error": 0.125, "repeat_error": 0.0625, "skill": -1.0, "skipped": False},
    ]
    assert _delta(after, before, "foveate_skipped_ticks")[("foveate_skipped_ticks_total", ())] == 1
    assert after[("foveate_trace_spectral_radius_max", ())] == 1.25
    assert _delta(after, before, "foveate_repeat_error")[("foveate_repeat_error_count", ())] == 2
    assert _skill(after, "7") == -1.0 and _skill(after, "2") == 0.5
    info = worker.records["s-b"].info()
    assert (info["skipped"], info["last_repeat_error"], info["skill"]) == (1, 0.5, 0.5)
    assert info["recent_errors"] == [{"step": 2, "error": 0.25, "repeat_error": 0.5}]
