"""Fixtures shared by the whole suite: real servers on loopback, the shared data set, CPU threads.

Fixtures
--------
``redis_server``          URL ``redis://127.0.0.1:PORT/0`` of a fresh, empty ``redis-server`` (no
                          persistence) that lives for one test.
``redis_server_factory``  a callable that starts another such server and returns a
                          :class:`bench._servers.RedisServer`
                          handle (``url``, ``port``, ``stop()``, ``start()``), for tests that restart or
                          need several servers; every server it started is killed at teardown.
``free_port``             the :func:`bench._servers.free_port` function: ``port = free_port()``.
``shared_osie``           ``Path`` of ``../shared/data/osie`` beside the repository; skips if absent.

Markers (registered in pyproject.toml): ``slow`` runs by default; ``gpu`` is skipped without CUDA.

A missing ``redis-server`` skips the tests that need it on a developer's machine, and fails them in CI
(``CI=true``), where ``scripts/install-test-servers.sh`` must have installed it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench import _servers
from bench._servers import RedisServer, find_binary

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # Lets `pytest` run from any directory import learner/, service/, clients/ without an install.
    sys.path.insert(0, str(REPO_ROOT))

# Torch sizes its intra-op pool from these when it is first imported; the CI machine has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")


def in_ci() -> bool:
    """Return True when running under CI (env ``CI`` set to true/1/yes)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def find_server_binary(name: str) -> str | None:
    """Find a server binary on PATH or in the repository's ``.tools/bin`` (where the installer puts them)."""
    return find_binary(name)


def require_server_binary(name: str) -> str:
    """Return the path of ``name``; skip the test when it is missing, or fail in CI."""
    path = find_server_binary(name)
    if path is None:
        message = (
            f"{name} not found on PATH or in {REPO_ROOT / '.tools' / 'bin'}; "
            "run `bash scripts/install-test-servers.sh`"
        )
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture
def free_port() -> Callable[[], int]:
    """The :func:`bench._servers.free_port` function, for tests that start their own servers."""
    return _servers.free_port


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Start real ``redis-server`` processes on demand; all are killed at teardown."""
    binary = require_server_binary("redis-server")
    started: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(binary, tmp_path / f"redis{len(started)}")
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def redis_server(redis_server_factory: Callable[[], RedisServer]) -> str:
    """URL (``redis://127.0.0.1:PORT/0``) of a fresh, empty redis-server for this test."""
    return redis_server_factory().url


@pytest.fixture(scope="session")
def shared_osie() -> Path:
    """``Path`` of the OSIE data set in ``../shared/data/osie``; skips the test when it is absent."""
    path = REPO_ROOT.parent / "shared" / "data" / "osie"
    if not path.is_dir():
        pytest.skip(f"OSIE data not found at {path} (expected shared/ beside the repository)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    """Cap torch at the CI machine's 2 cores, if torch is installed."""
    if importlib.util.find_spec("torch") is None:
        return
    import torch

    torch.set_num_threads(2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests when CUDA is not available."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)
