"""The ``worker-distributed`` compose service (profile ``distributed``): ``docker compose config`` (the
real Compose v2 binary) resolves it, and its torchrun line reaches the real ``foveate`` CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from foveate.cli import build_parser
from service.config import Settings
from service.dist_launch import check_settings
from tests.deploy.tools import COMPOSE_CPU_FILE, COMPOSE_FILE, compose_model, run_compose, write_env_file

GPU = [COMPOSE_FILE]
CPU = [COMPOSE_FILE, COMPOSE_CPU_FILE]


def _services(tmp_path: Path, files: list[Path], *args: str, **env: str) -> dict[str, Any]:
    env_file = write_env_file(tmp_path / "required.env", **env)
    services: dict[str, Any] = compose_model(files, *args, env_file=env_file)["services"]
    return services


@pytest.mark.parametrize("files", [GPU, CPU], ids=["gpu", "cpu"])
def test_the_profile_validates_and_is_off_by_default(tmp_path: Path, files: list[Path]) -> None:
    env_file = write_env_file(tmp_path / "required.env")
    proc = run_compose(files, "--profile", "distributed", "config", "--quiet", env_file=env_file)
    assert proc.returncode == 0, proc.stderr
    assert "worker-distributed" not in _services(tmp_path, files)
    assert "worker-distributed" in _services(tmp_path, files, "--profile", "distributed")


def test_torchrun_starts_two_ranks_of_the_distributed_worker(tmp_path: Path) -> None:
    service = _services(tmp_path, GPU, "--profile", "distributed")["worker-distributed"]
    assert service["entrypoint"] == ["torchrun"]
    command = service["command"]
    assert command[command.index("--nproc-per-node") + 1] == "2"
    module = command.index("-m")
    assert command[module + 1] == "foveate"
    args = build_parser().parse_args(command[module + 2 :])  # what each rank runs
    assert args.command == "worker" and args.distributed
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == 2 and device["capabilities"] == ["gpu"]  # one GPU per rank
    environment = service["environment"]
    known = {f"FOVEATE_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in environment if k.startswith("FOVEATE_")} <= known
    # The ranks start: their settings pass the distributed worker's own check; they checkpoint to
    # the checkpoints volume, where every rank (one machine) sees the same folder.
    assert environment["FOVEATE_CHECKPOINT_PATH"].startswith("/data/checkpoints/")
    mounts = {v["target"]: v for v in service["volumes"]}  # compose config resolves them to dicts
    assert mounts["/data/checkpoints"]["source"] == "checkpoints"
    settings = Settings(
        **{k[len("FOVEATE_") :].lower(): v for k, v in environment.items() if k != "FOVEATE_REDIS_URL"}
    )
    check_settings(settings, 2)


def test_the_cpu_override_runs_the_ranks_on_the_cpu(tmp_path: Path) -> None:
    service = _services(tmp_path, CPU, "--profile", "distributed")["worker-distributed"]
    assert "devices" not in (service.get("deploy") or {}).get("resources", {}).get("reservations", {})
    assert service["environment"]["FOVEATE_DEVICE"] == "cpu"
    assert service["build"]["args"]["VARIANT"] == "cpu"


def test_the_api_learns_the_number_of_shards_from_env(tmp_path: Path) -> None:
    assert _services(tmp_path, GPU)["api"]["environment"]["FOVEATE_SHARDS"] == "1"  # the single worker
    api = _services(tmp_path, GPU, "--profile", "distributed", FOVEATE_SHARDS="2")["api"]
    assert api["environment"]["FOVEATE_SHARDS"] == "2"
