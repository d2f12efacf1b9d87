"""The live stack for the deployment checks: real foveate processes scraped by a real Prometheus.

``live_stack`` (module scope) starts, all on 127.0.0.1 with a small model:

- a ``redis-server`` started with the command line of docker-compose.yml's ``redis`` service
  (append-only, ACL user ``foveate`` with a password, the default user off), and a ``foveate
  worker`` (its own ``/metrics``) and a ``foveate api`` over it: the Redis mode that
  ``docker-compose.yml`` runs, with the stack's ``FOVEATE_REDIS_URL``;
- a ``foveate serve`` (embedded mode: one process, one ``/metrics``);
- a ``prometheus`` whose config is ``docker/prometheus/prometheus.yml`` with its targets pointed
  at those processes (same job names, so ``alerts.yml``'s selectors mean what they mean in the
  stack), loading ``docker/prometheus/alerts.yml``, scraping every second.

It posts fixations through both APIs (resets, two streams, one bad request) so that the metrics
have values, and waits, bounded, until Prometheus has scraped every target.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import yaml

from bench._servers import LOOPBACK, free_port
from tests.conftest import REPO_ROOT, require_server_binary
from tests.deploy.tools import ALERTS_FILE, COMPOSE_FILE, PROMETHEUS_CONFIG, compose_model, write_env_file

SMALL_MODEL_ENV = {
    "FOVEATE_N_UNITS": "64",
    "FOVEATE_EMBED_DIM": "16",
    "FOVEATE_PRED_HIDDEN": "32",
    "FOVEATE_INPUT_SIZE": "32",
    "FOVEATE_SYNC_TIMEOUT_S": "60",  # a loaded 2-core CI machine can take >10 s on a first tick
    "FOVEATE_CHECKPOINT_PATH": "",  # empty: no checkpoints
    "FOVEATE_DIAGNOSTICS_INTERVAL_S": "1",
    "FOVEATE_LOG_LEVEL": "WARNING",
    "FOVEATE_CONTROL_SECRET": "test-control-secret",  # signs the API's commands to the worker
    "OMP_NUM_THREADS": "1",
}
STARTUP_TIMEOUT_S = 120.0  # three processes import torch at once on a 2-core machine
SCRAPE_TIMEOUT_S = 45.0
FIXATIONS_PER_STREAM = {"s1": 24, "s2": 5}  # s1 runs past step 20, into the "20+" label
_CHUNK = 4  # fixations per stream in one batch request


@dataclass
class Process:
    """A child process with its log file, stopped by :meth:`stop` (SIGTERM, then SIGKILL)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; log:\n{self.tail()}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)


@dataclass
class LiveStack:
    """URLs of the running processes and what was posted to them."""

    api_url: str
    worker_metrics_url: str
    embedded_url: str
    prometheus_url: str
    prometheus_config: dict[str, Any]
    redis: ComposeRedis
    posted: dict[str, int] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)

    def query(self, expr: str) -> httpx.Response:
        """``GET /api/v1/query`` on the Prometheus."""
        return httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr}, timeout=10)

    def vector(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector that ``expr`` evaluates to (asserts the query succeeded)."""
        response = self.query(expr)
        assert response.status_code == 200, f"{expr!r}: HTTP {response.status_code} {response.text}"
        body = response.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


def _spawn(name: str, args: list[str], env: dict[str, str], logdir: Path) -> Process:
    log = logdir / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, cwd=REPO_ROOT)  # fmt: skip
    return Process(name, popen, log)


def _wait_for(what: str, ready: Callable[[], bool], procs: list[Process], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            proc.check_alive()
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.name}:\n{p.tail()}" for p in procs)
    raise TimeoutError(f"{what} not ready within {timeout:.0f} s\n{logs}")


def _answers(url: str, status: int = 200) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=2).status_code == status


def _post_fixations(base_url: str) -> dict[str, int]:
    """POST every stream's fixations (random 32x32 patches, a reset first), then one bad request.

    Batches of a few fixations per stream: a stream's fixations take one worker tick each, and a
    batch of 24 from one stream would wait for 24 ticks (seconds on a loaded 2-core machine).
    """
    rng = np.random.default_rng(0)
    per_stream: dict[str, list[dict[str, Any]]] = {}
    for stream, count in FIXATIONS_PER_STREAM.items():
        per_stream[stream] = []
        for i in range(count):
            patch = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            raw = base64.b64encode(patch.tobytes()).decode()
            per_stream[stream].append(
                {"stream_id": stream, "raw_b64": raw, "shape": [32, 32, 3], "reset": i == 0}
            )
    longest = max(FIXATIONS_PER_STREAM.values())
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for start in range(0, longest, _CHUNK):
            items = [item for fixes in per_stream.values() for item in fixes[start : start + _CHUNK]]
            response = client.post("/v1/fixations/batch", json={"fixations": items})
            assert response.status_code == 200, response.text
            results = response.json()["results"]
            failed = [(i, item) for i, item in enumerate(results) if not item["ok"]]
            assert len(results) == len(items) and not failed, failed
        # raw pixels without their shape: a 4xx that the rejection counters record
        bad = client.post("/v1/streams/s1/fixations", json={"raw_b64": "AAAA"})
        assert 400 <= bad.status_code < 500, bad.text
    return dict(FIXATIONS_PER_STREAM)


def prometheus_config_for(targets: dict[str, str], scrape_interval: str = "1s") -> dict[str, Any]:
    """docker/prometheus/prometheus.yml with each job's targets replaced by ``targets[job]``.

    Jobs keep their names and metrics paths; a job without a target here is an error, so a new job
    in the compose config cannot go untested.
    """
    source = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = []
    for job in source["scrape_configs"]:
        name = job["job_name"]
        if name not in targets:
            raise KeyError(f"no test target for job {name!r} of {PROMETHEUS_CONFIG}; add one in {__file__}")
        jobs.append({"job_name": name, "metrics_path": job.get("metrics_path", "/metrics"),
                     "static_configs": [{"targets": [targets[name]]}]})  # fmt: skip
    for name in set(targets) - {job["job_name"] for job in jobs}:
        jobs.append({"job_name": name, "static_configs": [{"targets": [targets[name]]}]})
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(ALERTS_FILE)],
        "scrape_configs": jobs,
    }


@dataclass
class ComposeRedis:
    """A redis-server started with docker-compose.yml's own command line, on a loopback port."""

    process: Process
    port: int
    url: str  # FOVEATE_REDIS_URL of the compose api/worker, pointed at this server
    password: str
    healthcheck: list[str]  # the compose service's healthcheck test
    workdir: Path  # its --dir: the append-only files


def _start_compose_redis(binary: str, tmp: Path, procs: list[Process]) -> ComposeRedis:
    """redis-server with the compose service's flags (append-only, password), as compose resolves them."""
    password = "live-test-pw"
    env_file = write_env_file(tmp / "compose.env", REDIS_PASSWORD=password)
    services = compose_model([COMPOSE_FILE], env_file=env_file)["services"]
    urls = {services[name]["environment"]["FOVEATE_REDIS_URL"] for name in ("api", "worker")}
    assert len(urls) == 1, f"api and worker get different Redis URLs: {urls}"
    command = services["redis"]["command"]
    assert command[0] == "redis-server", command
    port = free_port()
    workdir = tmp / "redis"
    workdir.mkdir()
    # Later flags win: the compose flags stay, only where it listens and writes changes.
    args = [binary, *command[1:], "--port", str(port), "--bind", LOOPBACK, "--dir", str(workdir)]
    procs.append(_spawn("redis", args, dict(os.environ), tmp))
    url = urls.pop().replace("@redis:6379/", f"@{LOOPBACK}:{port}/")
    client = redis.Redis.from_url(url, socket_connect_timeout=1)

    def pong() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    _wait_for("redis-server", pong, procs, STARTUP_TIMEOUT_S)
    client.close()
    return ComposeRedis(procs[-1], port, url, password, services["redis"]["healthcheck"]["test"], workdir)


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    """Redis-mode API + worker, an embedded server, and a Prometheus scraping them (module docstring)."""
    redis_binary = require_server_binary("redis-server")
    prometheus_binary = require_server_binary("prometheus")
    tmp = tmp_path_factory.mktemp("live-stack")
    procs: list[Process] = []
    try:
        redis_server = _start_compose_redis(redis_binary, tmp, procs)
        env = {**os.environ, **SMALL_MODEL_ENV, "PYTHONPATH": str(REPO_ROOT)}
        env.pop("FOVEATE_REDIS_URL", None)
        api_port, worker_port, embedded_port, prom_port = (free_port() for _ in range(4))
        foveate = [sys.executable, "-m", "foveate"]
        url = redis_server.url
        worker_args = [
            "worker",
            "--redis",
            url,
            "--metrics-host",
            LOOPBACK,
            "--metrics-port",
            str(worker_port),
        ]
        procs.append(_spawn("worker", [*foveate, *worker_args], env, tmp))
        api_args = ["api", "--redis", url, "--host", LOOPBACK, "--port", str(api_port)]
        procs.append(_spawn("api", [*foveate, *api_args], env, tmp))
        embedded_args = ["serve", "--host", LOOPBACK, "--port", str(embedded_port)]
        procs.append(_spawn("embedded", [*foveate, *embedded_args], env, tmp))
        stack = LiveStack(
            api_url=f"http://{LOOPBACK}:{api_port}",
            worker_metrics_url=f"http://{LOOPBACK}:{worker_port}/metrics",
            embedded_url=f"http://{LOOPBACK}:{embedded_port}",
            prometheus_url=f"http://{LOOPBACK}:{prom_port}",
            prometheus_config={},
            redis=redis_server,
            processes=procs,
        )
        # /readyz answers 200 once the worker's heartbeat is in Redis: the whole Redis path is up.
        _wait_for("foveate api + worker", _answers(f"{stack.api_url}/readyz"), procs, STARTUP_TIMEOUT_S)
        _wait_for("foveate worker /metrics", _answers(stack.worker_metrics_url), procs, STARTUP_TIMEOUT_S)
        _wait_for("foveate serve", _answers(f"{stack.embedded_url}/readyz"), procs, STARTUP_TIMEOUT_S)
        stack.posted = _post_fixations(stack.api_url)
        _post_fixations(stack.embedded_url)

        stack.prometheus_config = prometheus_config_for({
            "foveate-api": f"{LOOPBACK}:{api_port}",
            "foveate-worker": f"{LOOPBACK}:{worker_port}",
            "prometheus": f"{LOOPBACK}:{prom_port}",
            "foveate-embedded": f"{LOOPBACK}:{embedded_port}",
        })  # fmt: skip
        config_path = tmp / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(stack.prometheus_config))
        procs.append(_spawn("prometheus", [
            prometheus_binary, f"--config.file={config_path}", f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address={LOOPBACK}:{prom_port}", "--log.level=warn",
        ], env, tmp))  # fmt: skip
        _wait_for("prometheus", _answers(f"{stack.prometheus_url}/-/ready"), procs, STARTUP_TIMEOUT_S)
        jobs = {job["job_name"] for job in stack.prometheus_config["scrape_configs"]}

        def all_scraped() -> bool:
            up = {r["metric"]["job"]: r["value"][1] for r in stack.vector("up")}
            fixations = stack.vector('foveate_fixations_total{job=~"foveate-worker|foveate-embedded"}')
            return all(up.get(job) == "1" for job in jobs) and len(fixations) == 2

        _wait_for("prometheus scraping every target", all_scraped, procs, SCRAPE_TIMEOUT_S)
        yield stack
    finally:
        for proc in reversed(procs):
            proc.stop()
