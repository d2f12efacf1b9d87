"""docs/deploy.md agrees with the files it documents: variables, paths and services."""

from __future__ import annotations

import re

from service.config import Settings
from tests.conftest import REPO_ROOT
from tests.deploy.tools import COMPOSE_CPU_FILE, COMPOSE_FILE, DOCKERFILES, compose_model

DEPLOY_DOC = REPO_ROOT / "docs" / "deploy.md"
_VAR = re.compile(r"\bFOVEATE_[A-Z0-9_]+\b")
_INTERPOLATED = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


def _compose_text() -> str:
    return COMPOSE_FILE.read_text() + COMPOSE_CPU_FILE.read_text()


def test_every_foveate_variable_is_a_setting_or_a_compose_knob() -> None:
    settings = {f"FOVEATE_{name.upper()}" for name in Settings.model_fields}
    settings |= {"FOVEATE_API_KEY", "FOVEATE_URL"}  # the clients' own (the demo's replay)
    knobs = set(_INTERPOLATED.findall(_compose_text()))
    sources = {
        path.name: path.read_text() for path in (DEPLOY_DOC, COMPOSE_FILE, COMPOSE_CPU_FILE, *DOCKERFILES)
    }
    for name, text in sources.items():
        unknown = set(_VAR.findall(text)) - settings - knobs
        assert not unknown, f"{name} names {sorted(unknown)}: neither a Settings field nor a compose variable"


def test_every_compose_variable_is_documented() -> None:
    doc = DEPLOY_DOC.read_text()
    missing = {name for name in _INTERPOLATED.findall(_compose_text()) if f"`{name}`" not in doc}
    assert not missing, f"docs/deploy.md does not document {sorted(missing)}"


def test_documented_paths_exist() -> None:
    doc = DEPLOY_DOC.read_text()
    paths = set(re.findall(r"`((?:docker|scripts|tests|docs|data|service)/[\w./-]+)`", doc))
    paths |= set(re.findall(r"\b(docker-compose(?:\.cpu)?\.yml)\b", doc))
    assert len(paths) >= 10
    missing = sorted(p for p in paths if not (REPO_ROOT / p.rstrip("/")).exists())
    assert not missing, f"docs/deploy.md names files that do not exist: {missing}"


def test_every_service_is_documented() -> None:
    doc = DEPLOY_DOC.read_text()
    services = compose_model([COMPOSE_FILE], "--profile", "demo")["services"]
    for name, service in services.items():
        assert f"| `{name}`" in doc, f"service {name} is not in the table of docs/deploy.md"
        image = service["image"].rsplit(":", 1)[0]
        assert image in doc, f"{name}'s image {image} is not in docs/deploy.md"
