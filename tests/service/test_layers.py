"""Data flows one way: the worker side (worker, brokers, learner) never imports the web framework.

Each check runs in a fresh interpreter, because this test process has imported FastAPI long before.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import learner
from tests.conftest import REPO_ROOT

_WEB = ("fastapi", "starlette", "uvicorn")
_WORKER_SIDE = [
    "service.worker",
    "service.broker",
    "service.redis_broker",
    "service.brokers",
    "service.errors",
    *(f"learner.{m.name}" for m in pkgutil.iter_modules(learner.__path__)),
]


def _web_modules_after_importing(modules: list[str]) -> list[str]:
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {_WEB!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_worker_side_imports_no_web_framework() -> None:
    assert "learner.rfp" in _WORKER_SIDE  # the learner's modules were found
    assert _web_modules_after_importing(_WORKER_SIDE) == []


def test_the_check_sees_a_web_import() -> None:
    """The negative control: the API's error handlers do import FastAPI, and the check says so."""
    assert "fastapi" in _web_modules_after_importing(["service.api.errors"])
