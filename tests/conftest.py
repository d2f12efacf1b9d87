"""Fixtures shared by the whole suite: real servers on loopback, the shared data set, CPU threads.

Fixtures
--------
``redis_server``          URL ``redis://127.0.0.1:PORT/0`` of a fresh, empty ``redis-server`` (no
                          persistence) that lives for one test.
``redis_server_factory``  a callable that starts another such server and returns a :class:`RedisServer`
                          handle (``url``, ``port``, ``stop()``, ``start()``), for tests that restart or
                          need several servers; every server it started is killed at teardown.
``free_port``             the :func:`find_free_port` function: ``port = free_port()``.
``shared_osie``           ``Path`` of ``../shared/data/osie`` beside the repository; skips if absent.

Markers (registered in pyproject.toml): ``slow`` runs by default; ``gpu`` is skipped without CUDA.

A missing ``redis-server`` skips the tests that need it on a developer's machine, and fails them in CI
(``CI=true``), where ``scripts/install-test-servers.sh`` must have installed it.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench._servers import find_binary

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # Lets `pytest` run from any directory import learner/, service/, clients/ without an install.
    sys.path.insert(0, str(REPO_ROOT))

# Torch sizes its intra-op pool from these when it is first imported; the CI machine has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

LOOPBACK = "127.0.0.1"
_SERVER_START_TIMEOUT_S = 15.0


def in_ci() -> bool:
    """Return True when running under CI (env ``CI`` set to true/1/yes)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Another process can take it before the caller binds it; servers started by these fixtures retry
    on a new port when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


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


def _tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class RedisServer:
    """A real ``redis-server`` on 127.0.0.1, without persistence, owned by one test.

    Parameters
    ----------
    binary
        Path of the ``redis-server`` executable.
    workdir
        Directory for the server's working files and its log.

    Examples
    --------
    >>> server = RedisServer(binary, tmp_path).start()  # doctest: +SKIP
    >>> server.url  # doctest: +SKIP
    'redis://127.0.0.1:40213/0'
    >>> server.stop()  # doctest: +SKIP
    """

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        if self.port is None:
            raise RuntimeError("RedisServer.url read before start()")
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"redis-{self.port}.log"

    def start(self, attempts: int = 3) -> RedisServer:
        """Start the server (again on its previous port after :meth:`stop`) and wait for PING."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("RedisServer.start() while it is already running")
        keep_port = self.port is not None  # a restart must come back where clients point
        error = ""
        for _ in range(attempts):
            if not keep_port:
                self.port = find_free_port()
            self._spawn()
            error = self._wait_ready()
            if not error:
                return self
            self.stop()
        raise RuntimeError(f"redis-server did not start on {LOOPBACK}:{self.port}: {error}")

    def _spawn(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def _wait_ready(self) -> str:
        """Return "" once PING answers, else why not."""
        assert self.process is not None and self.port is not None
        deadline = time.monotonic() + _SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"exited with {self.process.returncode}; log:\n{_tail(self.log_path)}"
            if _ping(self.port):
                return ""
            time.sleep(0.05)
        return f"no PONG within {_SERVER_START_TIMEOUT_S:.0f} s; log:\n{_tail(self.log_path)}"

    def stop(self) -> None:
        """Kill the server (SIGTERM, then SIGKILL after 5 s) and reap it; the port is kept."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None


def _ping(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
def free_port() -> Callable[[], int]:
    """The :func:`find_free_port` function, for tests that start their own servers."""
    return find_free_port


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
