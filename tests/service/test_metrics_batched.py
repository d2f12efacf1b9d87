"""metrics.observe_errors (one call per worker tick) records what observe_error per fixation did."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from service import metrics, running_stats


def _samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render("worker").decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_add_many_is_add_in_order() -> None:
    one, many = running_stats.StepMeans(alpha=0.3), running_stats.StepMeans(alpha=0.3)
    values = [0.9, 0.1, 0.5, 0.7, 0.2, 1.5]
    for v in values:
        expected = one.add("s", v)
    many.add_many("s", values[:2])  # a tick's values, then the next tick's: they chain
    assert many.add_many("s", values[2:]) == expected
    assert many._count == one._count


def test_observe_errors_matches_observe_error_per_fixation() -> None:
    steps = [1, 2, 2, 7, 30, 45, 2]
    errors = [math.nan, 0.25, 0.5, 1.0, 0.125, 0.75, 2.0]
    before = _samples()
    metrics.observe_errors(steps, errors)
    batched = _samples()
    for s, e in zip(steps, errors, strict=True):
        metrics.observe_error(s, e)
    after = _samples()

    def delta(new: dict, old: dict) -> dict:  # type: ignore[type-arg]
        names = ("foveate_prediction_error", "foveate_step_error")
        return {
            k: v - old.get(k, 0.0)
            for k, v in new.items()
            if k[0].startswith(names) and not k[0].endswith("_created")  # a timestamp
        }

    first, second = delta(batched, before), delta(after, batched)
    assert first == second
    assert first[("foveate_prediction_error_count", ())] == 6  # the NaN is not observed
    assert first[("foveate_step_error_count", (("step", "2"),))] == 3
    assert first[("foveate_step_error_sum", (("step", "20+"),))] == 0.875
    assert batched[("foveate_error_by_step", (("step", "7"),))] > 0.0
