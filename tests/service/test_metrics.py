"""metrics.py: names, bounded labels, and a scrape that Prometheus' own parser reads."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from service import metrics


def _families(which: str = "all") -> dict[str, object]:
    text = metrics.render(which).decode()  # type: ignore[arg-type]
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_every_metric_has_the_prefix_and_parses() -> None:
    families = _families()
    assert families
    assert all(name.startswith("foveate_") for name in families)
    for name in (
        "foveate_fixations",
        "foveate_prediction_error",
        "foveate_update_seconds",
        "foveate_queue_depth",
        "foveate_active_streams",
        "foveate_resets",
        "foveate_checkpoints",
        "foveate_batch_size",
        "foveate_effective_dimensionality",
        "foveate_rejected_requests",
        "foveate_worker_up",
        "foveate_repeat_error",
        "foveate_step_repeat_error",
        "foveate_prediction_skill",
        "foveate_skipped_ticks",
        "foveate_trace_spectral_radius_max",
    ):
        assert name in families, name


def test_api_and_worker_registries_are_disjoint() -> None:
    api, worker = set(_families("api")), set(_families("worker"))
    assert api and worker and not api & worker
    assert "foveate_http_requests" in api and "foveate_fixations" in worker


def test_step_labels_are_bounded() -> None:
    assert [metrics.step_label(s) for s in (1, 2, 20, 21, 5000)] == ["1", "2", "20", "20+", "20+"]
    for step in range(1, 200):
        metrics.observe_error(step, 0.5)
    fam = _families("worker")["foveate_error_by_step"]
    labels = {s.labels["step"] for s in fam.samples}  # type: ignore[attr-defined]
    assert labels <= {str(i) for i in range(1, 21)} | {"20+"}
    assert "20+" in labels


def test_nan_errors_are_not_observed() -> None:
    before = metrics.PREDICTION_ERROR._sum.get()  # type: ignore[attr-defined]
    metrics.observe_error(1, math.nan)
    assert metrics.PREDICTION_ERROR._sum.get() == before  # type: ignore[attr-defined]


def test_diagnostics_reach_their_gauges() -> None:
    metrics.set_diagnostics({"effective_dim": 7.5, "h_norm": 2.0, "max_trace_radius": 0.9, "spectrum": 1.0})
    samples = {s.name: s.value for f in _families("worker").values() for s in f.samples}  # type: ignore[attr-defined]
    assert samples["foveate_effective_dimensionality"] == 7.5
    assert samples["foveate_hidden_norm"] == 2.0
    assert samples["foveate_trace_spectral_radius_max"] == 0.9
    assert "foveate_retention_gain_max" not in samples  # renamed: max |tanh| said nothing about growth
