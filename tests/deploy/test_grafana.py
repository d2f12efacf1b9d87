"""The Grafana provisioning and dashboard: valid, wired to the provisioned data source, complete."""

from __future__ import annotations

from typing import Any

import yaml

from tests.deploy.tools import (
    COMPOSE_FILE,
    PROMETHEUS_CONFIG,
    PROVISIONING_DIR,
    compose_model,
    dashboard_exprs,
    dashboards,
)

DATASOURCES = PROVISIONING_DIR / "datasources" / "prometheus.yml"
PROVIDERS = PROVISIONING_DIR / "dashboards" / "foveate.yml"

# Issue 6's list of what the dashboard shows, as panel titles.
REQUIRED_PANELS = {
    "Prediction error over time",
    "Error by time step within a sequence",
    "Effective dimensionality",
    "Fixations per second",
    "Update latency p50 / p99",
    "Queue depth",
    "Active streams",
    "Resets per minute",
    # the model against the repeat-the-current-embedding baseline, and the RFP traces' growth
    "Skill against repeat",
    "Skill against repeat by time step",
    "Trace spectral radius",
    "Skipped ticks per second",
}


def _panels() -> list[dict[str, Any]]:
    return [panel for dash in dashboards().values() for panel in dash["panels"]]


def _datasource() -> dict[str, Any]:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return dict(source)


def test_datasource_points_at_the_compose_prometheus() -> None:
    source = _datasource()
    assert source["type"] == "prometheus" and source["isDefault"] is True
    services = compose_model([COMPOSE_FILE])["services"]
    assert "prometheus" in services
    assert source["url"] == "http://prometheus:9090"
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    # $__rate_interval is four scrape intervals: Grafana must know the real one.
    assert source["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]


def test_dashboard_provider_reads_the_mounted_folder() -> None:
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    grafana = compose_model([COMPOSE_FILE])["services"]["grafana"]
    mounts = {v["target"]: v["source"] for v in grafana["volumes"] if v["type"] == "bind"}
    path = provider["options"]["path"]
    assert path in mounts, f"the provider reads {path}, which compose does not mount"
    assert mounts[path].endswith("docker/grafana/dashboards")
    assert mounts["/etc/grafana/provisioning"].endswith("docker/grafana/provisioning")


def test_dashboard_is_valid_and_uses_the_provisioned_datasource() -> None:
    uid = _datasource()["uid"]
    assert dashboards(), "no dashboard JSON in docker/grafana/dashboards"
    for name, dash in dashboards().items():
        assert dash["uid"] and dash["title"], name
        assert 36 <= dash["schemaVersion"] <= 41, name
        ids = [panel["id"] for panel in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in dash["panels"]:
            assert panel["datasource"]["uid"] == uid, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == uid, panel["title"]
                assert target["expr"].strip(), panel["title"]


def test_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _panels():
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_shows_what_the_issue_asks() -> None:
    titles = {panel["title"] for panel in _panels()}
    assert REQUIRED_PANELS <= titles, f"missing panels: {REQUIRED_PANELS - titles}"
    exprs: dict[str, str] = {}
    for where, expr in dashboard_exprs():
        title = where.split("'")[1]
        exprs[title] = exprs.get(title, "") + " " + expr
    assert "histogram_quantile(0.5," in exprs["Update latency p50 / p99"]
    assert "histogram_quantile(0.99," in exprs["Update latency p50 / p99"]
    assert "rate(foveate_fixations_total" in exprs["Fixations per second"]
    assert "foveate_error_by_step" in exprs["Error by time step within a sequence"]
    by_title = {panel["title"]: panel for panel in _panels()}
    assert by_title["Error by time step within a sequence"]["type"] in {"barchart", "heatmap"}


def _threshold_lines(panel: dict[str, Any]) -> list[float]:
    """The values at which a panel draws threshold lines (none unless its style is "line")."""
    defaults = panel["fieldConfig"]["defaults"]
    if defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode") != "line":
        return []
    return [step["value"] for step in defaults["thresholds"]["steps"] if step["value"] is not None]


def test_skill_and_stability_panels_show_their_baselines() -> None:
    by_title = {panel["title"]: panel for panel in _panels()}
    exprs: dict[str, str] = {}
    for where, expr in dashboard_exprs():
        title = where.split("'")[1]
        exprs[title] = exprs.get(title, "") + " " + expr
    # repeat error next to model error
    assert "foveate_repeat_error_sum" in exprs["Prediction error over time"]
    assert "foveate_prediction_error_sum" in exprs["Prediction error over time"]
    # skill by step, with the line at 0 below which the model is worse than repeating
    assert 'foveate_prediction_skill{step!="all"}' in exprs["Skill against repeat by time step"]
    assert 'foveate_prediction_skill{step="all"}' in exprs["Skill against repeat"]
    for title in ("Skill against repeat", "Skill against repeat by time step"):
        assert _threshold_lines(by_title[title]) == [0], title
    assert by_title["Skill against repeat by time step"]["type"] == "barchart"
    # the retention panel became the traces' spectral radius, with its line at 1
    assert "foveate_trace_spectral_radius_max" in exprs["Trace spectral radius"]
    assert _threshold_lines(by_title["Trace spectral radius"]) == [1]
    assert "rate(foveate_skipped_ticks_total" in exprs["Skipped ticks per second"]
    assert not any("retention" in expr for expr in exprs.values())
