"""The Dockerfiles: hadolint, our own rules, and install steps identical to scripts/setup.sh's."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from foveate.cli import build_parser
from service.config import Settings
from tests.conftest import REPO_ROOT
from tests.deploy.tools import DOCKERFILES, require_tool

SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup.sh"
# pip options that change only caching and chatter, not what gets installed.
_PIP_NOISE = {"--no-cache-dir", "--quiet", "-q", "--progress-bar=off", "--root-user-action=ignore"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each instruction, continuation lines joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    if current:
        logical.append(current)
    return [
        (item.split(None, 1)[0].upper(), item.split(None, 1)[1] if " " in item else "") for item in logical
    ]


def pip_commands_in_shell(script: str, variables: dict[str, str] | None = None) -> list[tuple[str, ...]]:
    """Every ``pip install`` in shell text, as its arguments after ``pip``, minus the noise options."""
    for name, value in (variables or {}).items():
        script = script.replace("${" + name + "}", value).replace("$" + name, value)
    commands = []
    for segment in re.split(r"&&|\|\||;|\n|\|", script):
        try:
            words = shlex.split(segment, comments=True)
        except ValueError:
            continue
        if words[:1] == ["pip_quiet"]:
            words = words[1:]  # setup.sh's wrapper: `"$VENV_PY" -m pip --quiet "$@"`
        elif "pip" in words:
            words = words[words.index("pip") + 1 :]
        else:
            continue
        if "install" in words:
            commands.append(tuple(w for w in words if w not in _PIP_NOISE))
    return commands


def setup_pip_commands() -> list[tuple[str, ...]]:
    """The pip installs of scripts/setup.sh (the README's install), ``$EXTRAS`` expanded."""
    text = SETUP_SCRIPT.read_text()
    match = re.search(r'^EXTRAS="([^"]*)"', text, re.MULTILINE)
    assert match, f"no EXTRAS=... in {SETUP_SCRIPT}"
    return pip_commands_in_shell(text, {"EXTRAS": match.group(1)})


def dockerfile_pip_commands(path: Path) -> list[tuple[str, ...]]:
    return [cmd for kw, args in instructions(path) if kw == "RUN" for cmd in pip_commands_in_shell(args)]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = require_tool("hadolint", "scripts/install-deploy-tools.sh")
    proc = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    # The negative control: an untagged base, an unpinned cached pip install and root are all flagged.
    hadolint = require_tool("hadolint", "scripts/install-deploy-tools.sh")
    bad = tmp_path / "Dockerfile"
    bad.write_text('FROM python\nRUN pip install foveate\nCMD ["foveate"]\n')
    proc = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert {"DL3006", "DL3013", "DL3042"} <= set(re.findall(r"DL\d{4}", proc.stdout))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_install_steps_are_setup_sh_commands(dockerfile: Path) -> None:
    setup = setup_pip_commands()
    assert any("-e" in cmd for cmd in setup), f"no editable install of the project found in {SETUP_SCRIPT}"
    docker = dockerfile_pip_commands(dockerfile)
    assert docker, f"{dockerfile.name} installs nothing with pip"
    # The same commands, in the same order: what the README's setup installs is what the image runs.
    assert docker == setup, f"{dockerfile.name}: {docker} differ from scripts/setup.sh's {setup}"


def test_install_comparison_notices_a_different_command() -> None:
    # The negative control of the comparison: other extras, or a non-editable install, differ.
    setup = setup_pip_commands()
    assert pip_commands_in_shell('python -m pip install --no-cache-dir ".[test]"') != setup[-1:]
    assert pip_commands_in_shell("pip install --no-cache-dir .") != setup[-1:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_our_rules(dockerfile: Path) -> None:
    ins = instructions(dockerfile)
    kinds = [kw for kw, _ in ins]
    stages = {args.split()[-1] for kw, args in ins if kw == "FROM" and " AS " in args.upper()}
    for kw, args in ins:
        if kw == "FROM":
            image = args.split()[0]
            if any(image == s or image.startswith(s.split("-")[0] + "-") for s in stages):
                continue  # a stage of this file, not a registry image
            assert ":" in image and not image.endswith(":latest"), f"unpinned base image {image}"
    # Non-root from the last RUN on, by numeric uid (runAsNonRoot-friendly).
    user_at = max(i for i, kw in enumerate(kinds) if kw == "USER")
    assert user_at > max(i for i, kw in enumerate(kinds) if kw == "RUN")
    user = ins[user_at][1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {user}"
    (health,) = [args for kw, args in ins if kw == "HEALTHCHECK"]
    assert "CMD" in health and "NONE" not in health
    for kw, args in ins:
        if kw == "RUN" and "pip" in args and "install" in args:
            for cmd in re.split(r"&&", args):
                if "pip" in cmd and " install" in cmd:
                    assert "--no-cache-dir" in cmd, cmd


@pytest.mark.parametrize(("dockerfile", "command"), [(DOCKERFILES[0], "api"), (DOCKERFILES[1], "worker")],
                         ids=["api", "worker"])  # fmt: skip
def test_entrypoint_runs_the_real_cli(dockerfile: Path, command: str) -> None:
    ins = dict(instructions(dockerfile))
    assert ins["ENTRYPOINT"] == '["foveate"]'
    cmd = [part.strip(' "') for part in ins["CMD"].strip("[]").split(",")]
    assert build_parser().parse_args(cmd).command == command


def test_ports_and_volumes_match_the_settings() -> None:
    defaults = Settings()
    api, worker = (dict(instructions(path)) for path in DOCKERFILES)
    assert api["EXPOSE"] == str(defaults.port)
    assert worker["EXPOSE"] == str(defaults.worker_metrics_port)
    assert "${FOVEATE_PORT}/healthz" in api["HEALTHCHECK"]
    assert "${FOVEATE_WORKER_METRICS_PORT}/metrics" in worker["HEALTHCHECK"]
    assert "--max-heartbeat-age" in worker["HEALTHCHECK"]
    assert '"/data/checkpoints"' in worker["VOLUME"] and '"/data/weights"' in worker["VOLUME"]
    assert "FOVEATE_CHECKPOINT_PATH=/data/checkpoints/" in worker["ENV"]


def _top_level_packages() -> set[str]:
    """The top-level packages pyproject.toml ships (an explicit list, or packages.find's include)."""
    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    if "packages" in setuptools and isinstance(setuptools["packages"], list):
        names = setuptools["packages"]
    else:
        names = setuptools["packages"]["find"]["include"]
    return {name.split(".")[0].rstrip("*") for name in names}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copies_every_package_and_nothing_ignored(dockerfile: Path) -> None:
    packages = _top_level_packages()
    sources = [args.split()[0].rstrip("/") for kw, args in instructions(dockerfile) if kw == "COPY"]
    assert packages <= set(sources), f"{dockerfile.name} does not copy {packages - set(sources)}"
    ignored = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]  # fmt: skip
    for source in sources:
        assert (REPO_ROOT / source).exists(), source
        hits = [
            p for p in ignored if fnmatch.fnmatch(source, p) or fnmatch.fnmatch(source, p.rstrip("/") + "/*")
        ]
        assert not hits, f"{source} is copied but .dockerignore drops it ({hits})"
    for local_state in (".git", ".venv", ".tools"):
        assert local_state in ignored
