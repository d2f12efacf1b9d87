"""Helpers of the service tests: a small model, PNG bytes, real uvicorn servers and processes.

``small_settings(**changes)``  Settings of a small model (N=64, D=16, 32 px) for fast ticks.
``SMALL_ENV``                   the same as ``FOVEATE_*`` variables, for subprocesses.
``osie``                        three short OSIE scanpaths: frame JPEG, gaze points, 64 px patches.
``embedded``                    a real uvicorn serving ``create_app`` (embedded mode) in a thread,
                                shared by a test module.
``ServiceProcess``              ``python -m foveate serve|api|worker`` as a real subprocess.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np

from bench._servers import free_port, terminate

REPO_ROOT = Path(__file__).resolve().parents[2]

SMALL = {
    "n_units": 64,
    "embed_dim": 16,
    "pred_hidden": 32,
    "input_size": 32,
    "device": "cpu",
    "lr": 0.01,
    # plumbing tests: a few fixations must already be learned from, and whitened_mse (the default)
    # waits for its whitenings and metric to settle (about 24 fixations of one stream)
    "loss": "cosine",
    "max_wait_ms": 2.0,
    "heartbeat_timeout_s": 5.0,
    # signs the API's commands to a separate worker over Redis (`foveate api` and `worker` need one)
    "control_secret": "test-control-secret",
}
SMALL_ENV = {f"FOVEATE_{k.upper()}": str(v) for k, v in SMALL.items()}


def small_settings(**changes: Any) -> Any:
    """Settings of a small model, no checkpoints unless ``checkpoint_path`` is given."""
    from service.config import Settings

    values: dict[str, Any] = {**SMALL, "checkpoint_path": None, **changes}
    return Settings(**values)


def png(array: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 array."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(array, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


@dataclass
class Scanpath:
    """One OSIE viewing: the frame (JPEG bytes and RGB array) and its fixations (x, y, duration_ms)."""

    image: str
    subject: str
    jpeg: bytes
    frame: np.ndarray
    fixations: list[tuple[float, float, float]]
    patches: list[np.ndarray] = field(default_factory=list)  # 64 px RGB patches at the fixations


class ThreadedServer:
    """A real uvicorn server for an app, in a thread of the test process, on 127.0.0.1."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 60.0) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


class ServiceProcess:
    """``python -m foveate COMMAND`` as a subprocess with the small model; its log goes to a file."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        full_env = {**os.environ, **SMALL_ENV, "PYTHONPATH": str(REPO_ROOT), **env}
        full_env.setdefault("OMP_NUM_THREADS", "1")
        # beside the log, not the default checkpoints/ of the repository, which other tests' workers
        # (and an older foveate's checkpoint file) would share
        full_env.setdefault("FOVEATE_CHECKPOINT_PATH", str(log.parent / "checkpoint"))
        self.log = log
        self._log_file = open(log, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "foveate", *command],
            cwd=REPO_ROOT,
            env=full_env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_http(self, url: str, *, status: int = 200, timeout: float = 120.0) -> None:
        """Wait until ``GET url`` answers ``status``; fail with the log if the process dies first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"process exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(url, timeout=2.0).status_code == status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{url} did not answer {status} within {timeout} s:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait; SIGKILL after ``timeout``. Returns the exit code."""
        code = terminate(self.process, sig, timeout)
        self._log_file.close()
        return code


def post_patch(client: httpx.Client, stream: str, patch: np.ndarray, **fields: Any) -> dict[str, Any]:
    """POST one patch as JSON (base64 PNG) and return the 200 answer's body."""
    body = {"patch_b64": base64.b64encode(png(patch)).decode(), **fields}
    r = client.post(f"/v1/streams/{stream}/fixations", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape a /metrics URL and parse it with Prometheus' own parser: {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10.0).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def learn_passes(client: httpx.Client, paths: list[Scanpath], passes: int) -> list[float]:
    """Post every patch of ``paths`` ``passes`` times (one stream per path, reset at each start).

    Returns the mean prediction error of each pass; checks the step counts on the way. The seq
    numbers go on across passes: a pass that numbered from 0 again would be answered as duplicates.
    """
    means = []
    for p in range(passes):
        errors = []
        for k, path in enumerate(paths):
            for i, patch in enumerate(path.patches):
                seq = p * len(path.patches) + i
                out = post_patch(client, f"learn-{k}", patch, seq=seq, reset=i == 0)
                assert out["status"] == "applied" and out["gap"] == 0
                assert out["step"] == i + 1
                if out["error"] is not None:
                    errors.append(out["error"])
        means.append(float(np.mean(errors)))
    return means
