"""Real foveate processes for the client tests: ``python -m foveate serve`` and ``foveate worker``.

Each runs the small model (N=64, D=16, 32 px input) in a subprocess on 127.0.0.1 with checkpoints
off, its output in a log file that a failing test shows.

``SMALL_ENV``          the small model as ``FOVEATE_*`` variables (also for ``--embedded`` runs)
``FoveateProcess``     a ``python -m foveate ...`` subprocess; ``stop()`` sends SIGTERM, then SIGKILL
``start_server``       ``foveate serve`` on a free port, waited for until ``/readyz`` answers 200
``start_worker``       ``foveate worker --redis URL``, waited for until its heartbeat is in Redis
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from bench._servers import free_port, terminate

REPO_ROOT = Path(__file__).resolve().parents[2]

SMALL_ENV = {
    "FOVEATE_N_UNITS": "64",
    "FOVEATE_EMBED_DIM": "16",
    "FOVEATE_PRED_HIDDEN": "32",
    "FOVEATE_INPUT_SIZE": "32",
    "FOVEATE_LOSS": "cosine",  # learned from at once (whitened_mse waits for its metric to settle)
    "FOVEATE_SYNC_TIMEOUT_S": "60",  # a loaded 2-core CI machine can take >10 s on a first tick
    "FOVEATE_DEVICE": "cpu",
    "FOVEATE_CHECKPOINT_PATH": "",  # empty means None: no checkpoint files, a fresh model each run
    "FOVEATE_LOG_LEVEL": "WARNING",
    "FOVEATE_CONTROL_SECRET": "test-control-secret",  # `foveate api` and `worker` need the same one
}


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a foveate subprocess: the small model, the repository importable."""
    env = {**os.environ, **SMALL_ENV, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **extra}
    env.pop("FOVEATE_REDIS_URL", None)
    env.pop("FOVEATE_URL", None)
    return env


class FoveateProcess:
    """``python -m foveate ARGS`` in ``workdir``, stdout and stderr to ``workdir/NAME.log``."""

    def __init__(self, args: list[str], workdir: Path, name: str, env: dict[str, str]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / f"{name}.log"
        self._log_file = open(self.log, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "foveate", *args],
            cwd=workdir,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.url = ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        code = terminate(self.process, timeout=timeout)
        self._log_file.close()
        return code


def serve_on(
    port: int, workdir: Path, *, timeout: float = 120.0, name: str | None = None, **env: str
) -> FoveateProcess:
    """``foveate serve --port PORT`` (embedded mode); returns once ``/readyz`` answers 200."""
    proc = FoveateProcess(
        ["serve", "--port", str(port)], workdir, name or f"serve-{port}", subprocess_env(**env)
    )
    proc.url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.alive():
        try:
            if httpx.get(f"{proc.url}/readyz", timeout=2.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.stop()
    raise AssertionError(f"foveate serve on port {port} did not become ready:\n{proc.tail()}")


def start_server(workdir: Path, *, timeout: float = 120.0, **env: str) -> FoveateProcess:
    """``foveate serve`` (embedded mode) on a free port; returns once ``/readyz`` answers 200."""
    for _ in range(3):  # another process may take the free port before the server binds it
        try:
            return serve_on(free_port(), workdir, timeout=timeout, **env)
        except AssertionError as exc:
            if "address already in use" not in str(exc).lower():
                raise
    raise AssertionError("foveate serve found no free port in 3 attempts")


def start_worker(workdir: Path, redis_url: str, *, timeout: float = 120.0, **env: str) -> FoveateProcess:
    """``foveate worker --redis URL`` (no metrics port); returns once its heartbeat is fresh."""
    proc = FoveateProcess(
        ["worker", "--redis", redis_url, "--metrics-port", "0"], workdir, "worker", subprocess_env(**env)
    )
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise AssertionError(f"foveate worker exited with {proc.process.returncode}:\n{proc.tail()}")
            raw = client.get("foveate:worker:heartbeat")
            if raw is not None and time.time() - float(json.loads(raw)["ts"]) < 5.0:
                return proc
            time.sleep(0.1)
    finally:
        client.close()
    proc.stop()
    raise AssertionError(f"foveate worker wrote no heartbeat within {timeout} s:\n{proc.tail()}")
