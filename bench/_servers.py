"""Real servers for the benchmarks: ``redis-server`` and ``python -m foveate serve | worker`` subprocesses.

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
    """A TCP port on 127.0.0.1 that was free a moment ago."""
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


class RedisServer(_Process):
    """``redis-server`` on 127.0.0.1 without persistence; :meth:`start_in` starts it and waits for PING."""

    def __init__(self, binary: str, workdir: Path, port: int) -> None:
        self.port = port
        self.url = f"redis://{LOOPBACK}:{port}/0"
        cmd = [
            binary,
            "--port",
            str(port),
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        super().__init__(cmd, workdir, f"redis-{port}")

    @classmethod
    def start_in(cls, workdir: Path, *, binary: str | None = None, timeout: float = 15.0) -> RedisServer:
        """Start a server on a free port (``binary``: default :func:`find_binary`) and wait for PING."""
        binary = binary or find_binary("redis-server")
        if binary is None:
            raise RuntimeError(
                f"redis-server not found on PATH or in {REPO_ROOT / '.tools' / 'bin'}; "
                "install it (bash scripts/install-test-servers.sh) or leave out the redis mode"
            )
        server = cls(binary, workdir, free_port())
        client = redis.Redis(host=LOOPBACK, port=server.port, socket_connect_timeout=0.5)

        def pong() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            server.wait_until(pong, timeout, "answer PING")
        finally:
            client.close()
        return server


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
    port = free_port()
    proc = FoveateProcess(["serve", "--host", LOOPBACK, "--port", str(port)], workdir, "serve", env)
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
