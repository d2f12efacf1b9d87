"""A real Prometheus scrapes running foveate processes; the dashboard and alerts use only live metrics."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import time
from types import ModuleType

import httpx
import pytest
import redis

from bench._servers import free_port
from tests.deploy.conftest import LiveStack
from tests.deploy.promql import exported_series_names, metric_names, substitute_grafana_variables
from tests.deploy.tools import DOCKER_DIR, alert_exprs, dashboard_exprs, require_tool

# Starting three foveate processes (each imports torch) and a Prometheus takes 20-30 s on 2 cores.
pytestmark = pytest.mark.slow

# Series Prometheus makes itself for every target; the stack's rules may use them.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}


def _all_exprs() -> list[tuple[str, str]]:
    return dashboard_exprs() + alert_exprs()


def test_prometheus_scrapes_foveate_metrics_from_both_modes(live_stack: LiveStack) -> None:
    posted = sum(live_stack.posted.values())
    by_job = {r["metric"]["job"]: float(r["value"][1]) for r in live_stack.vector("foveate_fixations_total")}
    # The Redis-mode worker and the embedded server each applied every fixation posted to them.
    assert by_job == {"foveate-worker": posted, "foveate-embedded": posted}
    # The API's own counters: the batch posts answered 200, the bad request a 4xx.
    statuses = {
        r["metric"]["status"] for r in live_stack.vector('foveate_http_requests_total{job="foveate-api"}')
    }
    assert "200" in statuses and any(s.startswith("4") for s in statuses), statuses


def test_redis_mode_splits_metrics_between_api_and_worker(live_stack: LiveStack) -> None:
    # The API process serves only request metrics; learning metrics come from the worker's port.
    api_names = exported_series_names(httpx.get(f"{live_stack.api_url}/metrics", timeout=5).text)
    worker_names = exported_series_names(httpx.get(live_stack.worker_metrics_url, timeout=5).text)
    assert "foveate_http_requests_total" in api_names
    assert "foveate_fixations_total" not in api_names
    assert "foveate_fixations_total" in worker_names


def test_every_dashboard_and_alert_metric_is_exported_by_the_running_service(live_stack: LiveStack) -> None:
    # The stack runs in Redis mode: what Prometheus can see is the API's /metrics plus the worker's.
    exported = (
        exported_series_names(httpx.get(f"{live_stack.api_url}/metrics", timeout=5).text)
        | exported_series_names(httpx.get(live_stack.worker_metrics_url, timeout=5).text)
        | PROMETHEUS_OWN
    )
    exprs = _all_exprs()
    assert len(exprs) >= 20, "the dashboard or the alert rules lost their queries"
    unknown = {
        where: sorted(metric_names(expr) - exported) for where, expr in exprs if metric_names(expr) - exported
    }
    assert not unknown, f"PromQL names metrics the service does not export: {unknown}"
    # Every query selects at least one metric, so the check above was not vacuous.
    assert all(metric_names(expr) for _, expr in exprs)


def test_every_expression_is_valid_promql_for_a_real_prometheus(live_stack: LiveStack) -> None:
    bad = {}
    for where, expr in _all_exprs():
        response = live_stack.query(substitute_grafana_variables(expr))
        if response.status_code != 200 or response.json().get("status") != "success":
            bad[where] = f"{response.status_code}: {response.text[:300]}"
    assert not bad, f"Prometheus rejects these queries: {bad}"


def test_prometheus_rejects_invalid_promql(live_stack: LiveStack) -> None:
    # The negative control of the validity check above: a 400 is what an invalid query gets.
    response = live_stack.query("sum by (le (rate(foveate_update_seconds_bucket[1m]))")
    assert response.status_code == 400
    assert response.json()["errorType"] == "bad_data"


def test_dashboard_queries_return_data(live_stack: LiveStack) -> None:
    # After the posts, the learning panels have something to draw (rates need two scrapes: wait).
    wanted = ("Prediction error over time", "Fixations per second", "Update latency p50 / p99",
              "Active streams", "Effective dimensionality", "Resets per minute", "Skill against repeat",
              "Skill against repeat by time step", "Trace spectral radius",
              "Skipped ticks per second")  # fmt: skip
    exprs = [
        (where, expr) for where, expr in dashboard_exprs() if any(f"'{title}'" in where for title in wanted)
    ]
    assert len(exprs) >= len(wanted)
    empty: list[str] = []
    deadline = time.monotonic() + 30
    while True:
        empty = [where for where, expr in exprs if not live_stack.vector(substitute_grafana_variables(expr))]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not empty, f"these panels' queries return nothing from a live service: {empty}"


def test_error_by_step_labels_sort_in_step_order(live_stack: LiveStack) -> None:
    # The bar chart sorts its x axis as text; the query zero-pads steps so that text order is step order.
    (expr,) = [e for where, e in dashboard_exprs() if "Error by time step" in where]
    steps = [r["metric"]["step"] for r in live_stack.vector(expr)]
    longest = max(live_stack.posted.values())
    assert len(steps) == 20  # steps 2 .. 20 and "20+" (step 1 is never scored)
    assert sorted(steps) == [f"{s:02d}" for s in range(2, 21)] + ["20+"]
    assert longest > 20


def test_alert_rules_load_and_evaluate_cleanly(live_stack: LiveStack) -> None:
    deadline = time.monotonic() + 20
    while True:
        groups = httpx.get(f"{live_stack.prometheus_url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        evaluated = all(not rule.get("lastEvaluation", "").startswith("0001") for rule in rules.values())
        if evaluated or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(rules) == {where.removeprefix("alerts.yml: ") for where, _ in alert_exprs()}
    assert all(rule["health"] == "ok" and not rule.get("lastError") for rule in rules.values()), rules
    # API and worker are scraped under the job names the rules select: neither "down" rule matches.
    for name in ("FoveateWorkerDown", "FoveateApiDown", "FoveateWorkerStalled"):
        assert rules[name]["state"] == "inactive", rules[name]


def _healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("foveate_healthcheck", DOCKER_DIR / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_container_healthcheck_against_live_processes(live_stack: LiveStack) -> None:
    health = _healthcheck_module()
    assert health.main([f"{live_stack.api_url}/healthz"]) == 0
    assert health.main([live_stack.worker_metrics_url, "--max-heartbeat-age", "60"]) == 0
    # An hour from now the same heartbeat is stale: the worker check looks at the loop, not the port.
    reason = health.check(
        live_stack.worker_metrics_url, timeout=4, max_heartbeat_age=60, now=time.time() + 3600
    )
    assert reason is not None and "heartbeat" in reason
    # The API's /metrics has no worker gauges: the worker check refuses it.
    assert health.main([f"{live_stack.api_url}/metrics", "--max-heartbeat-age", "60"]) == 1
    assert health.main([f"http://127.0.0.1:{free_port()}/healthz", "--timeout", "1"]) == 1


@pytest.mark.parametrize("job", ["foveate-api", "foveate-worker"])
def test_compose_scrape_jobs_are_scraped(live_stack: LiveStack, job: str) -> None:
    # The job names come from docker/prometheus/prometheus.yml (the fixture keeps them).
    assert job in {j["job_name"] for j in live_stack.prometheus_config["scrape_configs"]}
    assert [r["value"][1] for r in live_stack.vector(f'up{{job="{job}"}}')] == ["1"]


def test_compose_redis_persists_and_requires_its_password(live_stack: LiveStack) -> None:
    # The redis-server runs with docker-compose.yml's command line; foveate reached it through the
    # stack's password URL (the posts above went through it).
    rds = live_stack.redis
    with redis.Redis(host="127.0.0.1", port=rds.port, socket_connect_timeout=2) as anonymous:
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
    with redis.Redis.from_url(rds.url, socket_connect_timeout=2) as client:
        assert client.xlen("foveate:fixations") >= sum(live_stack.posted.values())
        with pytest.raises(redis.exceptions.NoPermissionError):  # the stack's user runs no admin command
            client.config_get("appendonly")
    assert (rds.workdir / "appendonlydir").is_dir()  # append-only persistence


def test_compose_redis_healthcheck(live_stack: LiveStack) -> None:
    rds = live_stack.redis
    kind, command = rds.healthcheck[0], rds.healthcheck[1]
    assert kind == "CMD-SHELL"
    cli = require_tool("redis-cli", "scripts/install-test-servers.sh")
    # The container's redis listens on 6379; here the same probe is pointed at the test's port.
    probe = command.replace("redis-cli", f"{cli} -p {rds.port}")

    def run(password: str) -> int:
        env = {"PATH": os.environ.get("PATH", ""), "REDISCLI_AUTH": password}
        return subprocess.run(["sh", "-c", probe], env=env, capture_output=True, timeout=10).returncode

    assert run(rds.password) == 0
    assert run("wrong-password") != 0
