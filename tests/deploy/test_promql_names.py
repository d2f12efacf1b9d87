"""The PromQL metric-name extractor that the live-metrics check relies on."""

from __future__ import annotations

import pytest

from tests.deploy.promql import exported_series_names, metric_names, substitute_grafana_variables


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("foveate_queue_depth > 1000", {"foveate_queue_depth"}),
        ('up{job="foveate-worker"} == 0 or absent(up{job="foveate-worker"})', {"up"}),
        ("histogram_quantile(0.99, sum by (le) (rate(foveate_update_seconds_bucket[$__rate_interval])))",
         {"foveate_update_seconds_bucket"}),
        ("sum(rate(a_sum[10m])) by (job) / on (job) group_left (instance) sum(rate(a_count[10m])) by (job)",
         {"a_sum", "a_count"}),
        ('label_replace(foveate_error_by_step, "step", "0$1", "step", "([0-9])")', {"foveate_error_by_step"}),
        ("time() - max(foveate_last_checkpoint_timestamp_seconds > 0)",
         {"foveate_last_checkpoint_timestamp_seconds"}),
        ("x offset 5m * 1e3 + y @ start() - max_over_time(z[1h:5m]) > bool 2.5e-1", {"x", "y", "z"}),
        ('{__name__="by_name_only", job="a"} unless without_labels', {"by_name_only", "without_labels"}),
        ("rate(inf_total[5m]) > Inf and rate(nan_seconds[5m]) != NaN", {"inf_total", "nan_seconds"}),
    ],
)  # fmt: skip
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_grafana_variables_become_durations() -> None:
    expr = "rate(x[$__rate_interval]) + rate(y[${__interval}])"
    assert substitute_grafana_variables(expr) == "rate(x[1m]) + rate(y[15s])"


def test_exported_names_include_declared_families_and_suffixes() -> None:
    exposition = "\n".join([
        "# HELP foveate_rejected Rejections.",
        "# TYPE foveate_rejected counter",  # labelled, no child yet: still exported
        "# HELP foveate_update_seconds Tick time.",
        "# TYPE foveate_update_seconds histogram",
        'foveate_update_seconds_bucket{le="+Inf"} 1.0',
        "foveate_update_seconds_count 1.0",
        "foveate_update_seconds_sum 0.1",
        "# HELP foveate_queue_depth Waiting.",
        "# TYPE foveate_queue_depth gauge",
        "foveate_queue_depth 3.0",
        "",
    ])  # fmt: skip
    names = exported_series_names(exposition)
    assert {"foveate_rejected_total", "foveate_update_seconds_bucket", "foveate_update_seconds_sum",
            "foveate_update_seconds_count", "foveate_queue_depth"} <= names  # fmt: skip
    assert "foveate_update_seconds" not in names  # a histogram has no bare series
    assert "foveate_queue_depth_total" not in names
