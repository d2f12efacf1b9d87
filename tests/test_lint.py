"""The linters the project keeps clean run in the suite, so that CI, not a later reader, finds a
type error or a style slip (session 7 left a mypy error and a wrong docstring example that nothing ran).
The versions are pinned in pyproject.toml's ``test`` extra."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name(tool)  # the venv's, beside this interpreter
    path = str(exe) if exe.exists() else shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (pip install -e '.[test]')")
    return subprocess.run([path, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_check_finds_nothing() -> None:
    out = _run("ruff", "check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format_would_change_nothing() -> None:
    out = _run("ruff", "format", "--check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_finds_no_type_error(tmp_path: Path) -> None:
    out = _run("mypy", "--cache-dir", str(tmp_path / "mypy"))  # files: pyproject.toml [tool.mypy]
    assert out.returncode == 0, out.stdout + out.stderr
