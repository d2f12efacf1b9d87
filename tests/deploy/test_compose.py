"""``docker compose config`` (the real Compose v2 binary) validates and resolves the stack as documented."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench._servers import LOOPBACK, free_port
from foveate.cli import build_parser
from service.config import Settings
from tests.conftest import REPO_ROOT, require_server_binary
from tests.deploy.tools import (
    COMPOSE_CPU_FILE,
    COMPOSE_FILE,
    REQUIRED_ENV,
    compose_model,
    run_compose,
    write_env_file,
)

CORE_SERVICES = {"redis", "api", "worker", "prometheus", "grafana"}
GPU = [COMPOSE_FILE]
CPU = [COMPOSE_FILE, COMPOSE_CPU_FILE]


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    """An env file with only the required variables instead of the project's `.env`, so that a
    developer's settings do not leak in."""
    return write_env_file(tmp_path / "required.env")


def _model(env_file: Path, files: list[Path] = GPU, *args: str, **env: str) -> dict[str, Any]:
    return compose_model(files, *args, env=env, env_file=env_file)


@pytest.mark.parametrize(
    ("files", "args"),
    [(GPU, ()), (GPU, ("--profile", "demo")), (CPU, ()), (CPU, ("--profile", "demo"))],
    ids=["gpu", "gpu-demo", "cpu", "cpu-demo"],
)
def test_compose_config_validates(env_file: Path, files: list[Path], args: tuple[str, ...]) -> None:
    proc = run_compose(files, *args, "config", "--quiet", env_file=env_file)
    assert proc.returncode == 0, proc.stderr


def test_compose_config_rejects_an_invalid_file(tmp_path: Path, env_file: Path) -> None:
    # The negative control: the binary really validates (a misspelt key and a bad port are errors).
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    healthcheck:\n", "    healthchek:\n", 1))
    proc = run_compose([broken], "config", "--quiet", env_file=env_file)
    assert proc.returncode != 0
    assert "healthchek" in proc.stderr


def test_services_and_demo_profile(env_file: Path) -> None:
    assert set(_model(env_file)["services"]) == CORE_SERVICES
    assert set(_model(env_file, GPU, "--profile", "demo")["services"]) == CORE_SERVICES | {"demo"}


def test_redis_is_persistent_and_password_protected(tmp_path: Path) -> None:
    services = _model(write_env_file(tmp_path / "e.env", REDIS_PASSWORD="s3cret-pw"))["services"]
    redis = services["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    users = [i for i, arg in enumerate(command) if arg == "--user"]
    assert command[users[0] + 1 : users[0] + 3] == ["default", "off"]  # no password-less user
    assert command[users[1] + 1 : users[1] + 4] == ["foveate", "on", ">s3cret-pw"]
    assert any(v["type"] == "volume" and v["target"] == "/data" for v in redis["volumes"])
    assert "--user foveate" in " ".join(redis["healthcheck"]["test"])
    # The same user, password and control secret reach both halves of the service.
    for name in ("api", "worker"):
        environment = services[name]["environment"]
        assert environment["FOVEATE_REDIS_URL"] == "redis://foveate:s3cret-pw@redis:6379/0"
        assert environment["FOVEATE_CONTROL_SECRET"] == REQUIRED_ENV["FOVEATE_CONTROL_SECRET"]
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["api"]["environment"]["FOVEATE_API_KEYS"] == REQUIRED_ENV["FOVEATE_API_KEYS"]


@pytest.mark.parametrize("name", sorted(REQUIRED_ENV))
def test_compose_stops_without_a_required_secret(tmp_path: Path, name: str) -> None:
    # No default password anywhere: a missing one is an error that says what to set.
    proc = run_compose(
        [COMPOSE_FILE], "config", "--quiet", env_file=write_env_file(tmp_path / "e.env", **{name: ""})
    )
    assert proc.returncode != 0
    assert f"set {name} in .env" in proc.stderr, proc.stderr


def test_the_compose_redis_acl_on_a_real_redis_server(tmp_path: Path) -> None:
    import subprocess
    import time

    import redis

    binary = require_server_binary("redis-server")
    command = _model(write_env_file(tmp_path / "e.env"))["services"]["redis"]["command"]
    port = free_port()
    args = [binary, *command[1:], "--port", str(port), "--bind", LOOPBACK, "--dir", str(tmp_path),
            "--appendonly", "no"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        service = redis.Redis(
            host=LOOPBACK, port=port, username="foveate", password=REQUIRED_ENV["REDIS_PASSWORD"]
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                assert service.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=LOOPBACK, port=port).ping()  # the default user is off
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=LOOPBACK, port=port, username="foveate", password="guess").ping()
        assert service.xadd("foveate:fixations", {"stream_id": "s"})
        for refused in (lambda: service.set("other:key", 1), lambda: service.keys("*"),
                        lambda: service.config_get("*"), lambda: service.flushall()):  # fmt: skip
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
    finally:
        proc.kill()
        proc.wait()


def test_published_ports_stay_on_loopback_by_default(env_file: Path) -> None:
    services = _model(env_file)["services"]
    published = {
        (name, p["target"]): p.get("host_ip") for name, s in services.items() for p in s.get("ports", [])
    }
    assert published, "the stack publishes nothing"
    assert set(published.values()) == {"127.0.0.1"}, published
    assert {("api", 8000), ("grafana", 3000), ("prometheus", 9090)} <= set(published)


def test_gpu_worker_reserves_one_nvidia_gpu(env_file: Path) -> None:
    worker = _model(env_file)["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    assert worker["build"]["args"]["VARIANT"] == "gpu"
    assert worker["environment"]["FOVEATE_DEVICE"] == "cuda"


def test_cpu_override_drops_the_gpu_and_builds_the_cpu_image(env_file: Path) -> None:
    gpu = _model(env_file)["services"]["worker"]
    cpu = _model(env_file, CPU)["services"]["worker"]
    assert "devices" not in (cpu.get("deploy") or {}).get("resources", {}).get("reservations", {})
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    assert cpu["environment"]["FOVEATE_DEVICE"] == "cpu"
    assert cpu["image"] != gpu["image"]  # the two variants do not overwrite each other's image
    # Everything else about the worker stays as in the GPU stack.
    for key in ("command", "volumes", "depends_on"):
        assert cpu[key] == gpu[key], key


def test_worker_volumes_and_checkpoint_path(env_file: Path) -> None:
    worker = _model(env_file, FOVEATE_WEIGHTS_DIR="/srv/weights")["services"]["worker"]
    mounts = {v["target"]: v for v in worker["volumes"]}
    assert mounts["/data/checkpoints"]["type"] == "volume"
    assert mounts["/data/weights"]["source"] == "/srv/weights"
    assert mounts["/data/weights"].get("read_only") is True
    assert worker["environment"]["FOVEATE_CHECKPOINT_PATH"].startswith("/data/checkpoints/")


def test_service_environment_is_known_to_settings(env_file: Path) -> None:
    # A misspelt FOVEATE_ variable would be silently ignored by pydantic-settings; catch it here.
    known = {f"FOVEATE_{name.upper()}" for name in Settings.model_fields}
    known.add("FOVEATE_API_KEY")  # the clients' key (the demo's replay), not a server setting
    model = _model(env_file, GPU, "--profile", "demo")
    for name, service in model["services"].items():
        unknown = {k for k in service.get("environment") or {} if k.startswith("FOVEATE_")} - known
        assert not unknown, f"{name}: {unknown} are not Settings fields"


def test_service_commands_parse_with_the_real_cli(env_file: Path) -> None:
    parser = build_parser()
    services = _model(env_file, GPU, "--profile", "demo")["services"]
    for name, expected in (("api", "api"), ("worker", "worker"), ("demo", "replay")):
        args = parser.parse_args(services[name]["command"])
        assert args.command == expected, name
    demo = parser.parse_args(services["demo"]["command"])
    api_port = services["api"]["environment"]["FOVEATE_PORT"]
    assert demo.server == f"http://api:{api_port}"
    (data,) = [v for v in services["demo"]["volumes"] if v["target"] == str(demo.dataset)]
    assert (Path(data["source"]) / "fixations.csv").is_file()  # the bundled data set by default


def test_monitoring_mounts_exist_in_the_repository(env_file: Path) -> None:
    services = _model(env_file)["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            if volume["type"] == "bind":
                source = Path(volume["source"])
                assert source.exists(), f"{name} mounts {source}, which is not in the repository"
                assert source.is_relative_to(REPO_ROOT)
    targets = {v["target"] for v in services["prometheus"]["volumes"]}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= targets
    grafana = services["grafana"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    (dash_mount,) = [v for v in grafana["volumes"] if home.startswith(v["target"] + "/")]
    assert (Path(dash_mount["source"]) / Path(home).relative_to(dash_mount["target"])).is_file()


def test_grafana_admin_password_comes_from_the_environment(tmp_path: Path) -> None:
    env_file = write_env_file(tmp_path / "e.env", GRAFANA_ADMIN_PASSWORD="not-admin")
    grafana = _model(env_file)["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "not-admin"
