"""Prometheus and the dashboard with the ranks of ``worker-distributed``: one target per rank, each
labelled with its rank, and panels that count the ranks' one model once.

- The ports that prometheus.yml scrapes under the name ``worker-distributed`` are exactly the ranks'
  metrics ports of docker-compose.yml (``FOVEATE_WORKER_METRICS_PORT + r`` for each rank of
  torchrun's ``--nproc-per-node``): adding a rank without its target fails here.
- A real Prometheus, given the job's own relabelling and those ports as targets, labels a rank's
  series ``rank="r"`` and leaves the single worker's without one.
- ``promtool`` evaluates the dashboard's update panels on two ranks (every rank counts the group's
  updates) and on two single workers (each its own model).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench._servers import LOOPBACK, free_port
from tests.deploy.promql import substitute_grafana_variables
from tests.deploy.tools import COMPOSE_FILE, PROMETHEUS_CONFIG, compose_model, dashboard_exprs, require_tool

INSTALLER = "scripts/install-test-servers.sh"
BOUND_S = 60.0  # waiting longer than this for Prometheus is a failure, not a slow machine


def _worker_job() -> dict[str, Any]:
    (job,) = [j for j in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
              if j["job_name"] == "foveate-worker"]  # fmt: skip
    return dict(job)


def _scraped_ports(name: str) -> list[int]:
    return [sd["port"] for sd in _worker_job()["dns_sd_configs"] if sd["names"] == [name]]


def test_every_rank_of_worker_distributed_is_scraped() -> None:
    service = compose_model([COMPOSE_FILE], "--profile", "distributed")["services"]["worker-distributed"]
    command = service["command"]
    ranks = int(command[command.index("--nproc-per-node") + 1])
    base = int(service["environment"]["FOVEATE_WORKER_METRICS_PORT"])
    assert _scraped_ports("worker-distributed") == [base + r for r in range(ranks)]
    assert base + ranks - 1 <= 9119, "the rank label is the port's last digit: 9110-9119"
    assert _scraped_ports("worker") == [9101]  # the single worker's, unlabelled


def test_prometheus_labels_each_rank_by_its_port(tmp_path: Path) -> None:
    prometheus = require_tool("prometheus", INSTALLER)
    job = _worker_job()
    ports = [sd["port"] for sd in job["dns_sd_configs"]]
    # the job as in the stack, with the DNS names' targets on this machine (Prometheus relabels a
    # target whether or not it answers; nothing here needs to listen)
    targets = [f"{LOOPBACK}:{port}" for port in ports]
    test_job = {"job_name": job["job_name"], "relabel_configs": job["relabel_configs"],
                "static_configs": [{"targets": targets}]}  # fmt: skip
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": [test_job]}))
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address={LOOPBACK}:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + BOUND_S
        labels: dict[str, str | None] = {}
        while len(labels) < len(targets):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"Prometheus listed {labels}, not {targets}"
            try:
                reply = httpx.get(f"{url}/api/v1/targets", timeout=5)
            except httpx.HTTPError:  # not listening yet
                reply = None
            if reply is not None and reply.status_code == 200:  # 503 while it starts
                labels = {t["labels"]["instance"]: t["labels"].get("rank")
                          for t in reply.json()["data"]["activeTargets"]}  # fmt: skip
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ranks = {f"{LOOPBACK}:{p}": str(r) for r, p in enumerate(_scraped_ports("worker-distributed"))}
    assert labels == {**ranks, f"{LOOPBACK}:9101": None}


def _panel_expr(title: str, ref: str) -> str:
    (expr,) = [e for where, e in dashboard_exprs() if f"panel {title!r} {ref}" in where]
    return substitute_grafana_variables(expr)


def _series(instances: dict[str, str], per_minute: dict[str, int], minutes: int) -> list[dict[str, str]]:
    """``foveate_updates_total`` of each instance (its labels), growing by ``per_minute`` a minute."""
    return [
        {"series": f"foveate_updates_total{{job=\"foveate-worker\", {labels}}}",
         "values": f"0+{per_minute[name]}x{minutes}"}
        for name, labels in instances.items()
    ]  # fmt: skip


def test_the_update_panels_count_the_ranks_model_once(tmp_path: Path) -> None:
    promtool = require_tool("promtool", INSTALLER)
    total, rate = _panel_expr("Updates applied", "A"), _panel_expr("Fixations per second", "B")
    minutes = 10
    # two ranks of one model: every rank counts every update of the group (60 a minute)
    ranks = {"r0": 'instance="10.0.0.5:9110", rank="0"', "r1": 'instance="10.0.0.5:9111", rank="1"'}
    # two single workers, each its own model: 60 and 120 updates a minute
    singles = {"a": 'instance="10.0.0.6:9101"', "b": 'instance="10.0.0.7:9101"'}
    cases = [
        (_series(ranks, {"r0": 60, "r1": 60}, minutes), 60 * minutes, 1.0),
        (_series(singles, {"a": 60, "b": 120}, minutes), 180 * minutes, 3.0),
    ]
    tests = []
    for series, updates, per_second in cases:
        checks = [(total, updates), (rate, per_second)]
        tests.append({
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [
                {"expr": expr, "eval_time": f"{minutes}m", "exp_samples": [{"labels": "{}", "value": value}]}
                for expr, value in checks
            ],
        })  # fmt: skip
    unit = tmp_path / "dashboard_test.yml"
    unit.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": tests}))
    proc = subprocess.run([promtool, "test", "rules", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
