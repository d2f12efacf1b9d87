"""Real servers for the benchmarks and the tests: ``redis-server`` and ``python -m foveate serve | worker``.

The single home of :func:`free_port` and :class:`RedisServer`: ``tests/conftest.py`` and the test helpers
import them from here (the benchmarks run without pytest, so the code lives on this side).

Each runs on 127.0.0.1 on a free port, its output in a log file under a work folder, and is waited for
until it answers (PING, ``/readyz``, or the worker's heartbeat in Redis). ``stop()`` sends SIGTERM, then
SIGKILL. :func:`cpu_seconds` reads a process's CPU time from ``/proc`` so that a benchmark can say
where the CPU went.

Examples
--------
>>> with RedisServer.start_in(Path("/tmp/bench")) as redis_srv:          # doctest: +SKIP
...     with start_worker(redis_srv.url, Path("/tmp/bench"), {}) as worker:
...         print(worker.metrics_url)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx
import redis

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"


def terminate(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:  # type: ignore[type-arg]
    """Send ``sig`` to a running process, SIGKILL it if it has not exited after ``timeout``; its exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return int(process.returncode)


def find_binary(name: str) -> str | None:
    """``name`` on PATH, else in the repository's ``.tools/bin`` (where the test installer puts it)."""
    found = shutil.which(name)
    if found:
        return found
    local = REPO_ROOT / ".tools" / "bin" / name
    return str(local) if local.is_file() and os.access(local, os.X_OK) else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Another process can take it before the caller binds it; :class:`RedisServer` and the tests' server
    starters retry on a new port when that happens. The one copy: tests import it from here.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """User + system CPU seconds of process ``pid`` (all threads), or of its thread ``tid``, from ``/proc``.

    None where ``/proc`` is not there (not Linux) or the process has gone.
    """
    path = Path(f"/proc/{pid}/stat") if tid is None else Path(f"/proc/{pid}/task/{tid}/stat")
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the ")" that closes the command name, utime and stime are fields 12 and 13 (0-based 11, 12).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, all cores, from ``/proc/stat``."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    ticks = [int(v) for v in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


class _Process:
    """A subprocess with its output in ``workdir/NAME.log``; a context manager that stops it."""

    def __init__(self, cmd: list[str], workdir: Path, name: str, env: dict[str, str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log = workdir / f"{name}.log"
        self._log_file = open(self.log, "ab")
        self.process = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.pid)

    def died(self) -> RuntimeError:
        return RuntimeError(
            f"{self.name} exited with {self.process.returncode}; log {self.log}:\n{self.tail()}"
        )

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready()`` until it is true; stop the process and raise if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                self.stop()
                raise self.died()
            if ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"{self.name} did not {what} within {timeout:.0f} s; log {self.log}:\n{self.tail()}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a foveate process checkpoints if configured to), then SIGKILL after ``timeout``."""
        terminate(self.process, timeout=timeout)
        self._log_file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


class RedisServer:
    """A real ``redis-server`` on 127.0.0.1 without persistence; the one the benchmarks and the tests use.

    :meth:`start` picks a free port (another on a clash) and waits for PING; after :meth:`stop` a second
    :meth:`start` comes back on the same port, empty, so clients that pointed at it find it again.
    :meth:`start_in` does both steps; the server is a context manager that stops it.

    Parameters
    ----------
    binary
        Path of the ``redis-server`` executable.
    workdir
        Directory for the server's files and its log ``redis-PORT.log``.

    Examples
    --------
    >>> server = RedisServer(find_binary("redis-server"), Path("/tmp/r")).start()  # doctest: +SKIP
    >>> server.url  # doctest: +SKIP
    'redis://127.0.0.1:40213/0'
    >>> server.stop()  # doctest: +SKIP
    """

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def start_in(cls, workdir: Path, *, binary: str | None = None, timeout: float = 15.0) -> RedisServer:
        """Start a server on a free port (``binary``: default :func:`find_binary`) and wait for PING."""
        binary = binary or find_binary("redis-server")
        if binary is None:
            raise RuntimeError(
                f"redis-server not found on PATH or in {REPO_ROOT / '.tools' / 'bin'}; "
                "install it (bash scripts/install-test-servers.sh) or leave out the redis mode"
            )
        return cls(binary, workdir).start(timeout=timeout)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        if self.port is None:
            raise RuntimeError("RedisServer.url read before start()")
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.workdir / f"redis-{self.port}.log"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("RedisServer.pid read while it is not running")
        return self.process.pid

    def start(self, attempts: int = 3, timeout: float = 15.0) -> RedisServer:
        """Start the server (again on its previous port after :meth:`stop`) and wait for PING."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("RedisServer.start() while it is already running")
        keep_port = self.port is not None  # a restart must come back where clients point
        error = ""
        for _ in range(attempts):
            if not keep_port:
                self.port = free_port()  # another process may take it first: then try another
            self._spawn()
            error = self._wait_ready(timeout)
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
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def _wait_ready(self, timeout: float) -> str:
        """ "" once PING answers, else why not."""
        assert self.process is not None and self.port is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"exited with {self.process.returncode}; log {self.log}:\n{_tail(self.log)}"
            if _ping(self.port):
                return ""
            time.sleep(0.05)
        return f"no PONG within {timeout:.0f} s; log {self.log}:\n{_tail(self.log)}"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; the port is kept for a restart."""
        if self.process is not None:
            terminate(self.process, timeout=timeout)
            self.process = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def _tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _ping(port: int) -> bool:
    """A raw RESP PING, so that a wait for the server needs no client library."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class FoveateProcess(_Process):
    """``python -m foveate ARGS``; ``url`` (the API) and ``metrics_url`` are set by the starters below."""

    def __init__(self, args: list[str], workdir: Path, name: str, env: dict[str, str]) -> None:
        # the repository first, then whatever the caller's PYTHONPATH adds (extra packages to try)
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        full_env = {**os.environ, "PYTHONPATH": path, **env}
        super().__init__([sys.executable, "-m", "foveate", *args], workdir, name, full_env)
        self.url = ""
        self.metrics_url = ""


def start_serve(workdir: Path, env: dict[str, str], *, timeout: float = 180.0) -> FoveateProcess:
    """``foveate serve`` (embedded: API and worker in one process) on a free port, once ``/readyz`` is 200.

    ``env`` holds ``FOVEATE_*`` settings (and thread counts) for the process.
    """
    return start_http(["serve"], workdir, "serve", env, timeout)


def start_http(
    args: list[str], workdir: Path, name: str, env: dict[str, str], timeout: float = 180.0
) -> FoveateProcess:
    """``foveate ARGS --host 127.0.0.1 --port P`` (an API) on a free port, once ``/readyz`` is 200."""
    port = free_port()
    proc = FoveateProcess([*args, "--host", LOOPBACK, "--port", str(port)], workdir, name, env)
    proc.url = f"http://{LOOPBACK}:{port}"
    proc.metrics_url = f"{proc.url}/metrics"

    def ready() -> bool:
        try:
            return httpx.get(f"{proc.url}/readyz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    proc.wait_until(ready, timeout, "answer /readyz")
    return proc


def start_worker(
    redis_url: str, workdir: Path, env: dict[str, str], *, timeout: float = 180.0
) -> FoveateProcess:
    """``foveate worker --redis URL`` with its metrics on a free port, once its heartbeat is in Redis."""
    port = free_port()
    args = ["worker", "--redis", redis_url, "--metrics-host", LOOPBACK, "--metrics-port", str(port)]
    # The worker refuses to run without the secret that signs an API's commands; none is sent here.
    env = {"FOVEATE_CONTROL_SECRET": secrets.token_hex(16), **env}
    proc = FoveateProcess(args, workdir, "worker", env)
    proc.metrics_url = f"http://{LOOPBACK}:{port}/metrics"
    client = redis.Redis.from_url(redis_url)
    key = env.get("FOVEATE_HEARTBEAT_KEY", "foveate:worker:heartbeat")

    def beating() -> bool:
        raw = client.get(key)
        return raw is not None and time.time() - float(json.loads(raw)["ts"]) < 5.0

    try:
        proc.wait_until(beating, timeout, "write its heartbeat")
    finally:
        client.close()
    return proc
