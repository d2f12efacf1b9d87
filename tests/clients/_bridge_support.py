"""Shared by the fixation-detector and bridge tests: synthetic gaze, a recording sink, LSL on loopback.

``synthetic_gaze``      raw gaze with known fixations (noise, saccades, dropped samples, one blink)
``RecordingSink``       a :class:`clients.bridges.common.Sink` that records, and can play a server that
                        is down (``down``) or that refuses some fixations (``reject_seqs``)
``write_lsl_config``    an ``lsl_api.cfg`` that keeps liblsl on 127.0.0.1 (see its docstring)
``serve_on``            ``foveate serve`` on a given port (to restart a killed server where clients point)
``wait_for``            poll a condition with a deadline
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from clients.bridges.common import OutgoingFixation, PostResult, SinkRejected, SinkUnavailable
from tests.clients._servers import FoveateProcess
from tests.clients._servers import serve_on as _serve_on

RATE_HZ = 250.0
DT = 1.0 / RATE_HZ
PX_PER_DEG = 30.0
NOISE_DEG = 0.03  # per axis, a typical video-based tracker


@dataclass
class TrueFixation:
    onset: float
    offset: float
    x_deg: float
    y_deg: float


def synthetic_gaze(
    seed: int, *, n_fix: int = 8, blink_in: int | None = 3, noise_deg: float = NOISE_DEG, t0: float = 0.0
) -> tuple[list[tuple[float, float, float, float]], list[TrueFixation]]:
    """Samples ``(t, x_px, y_px, conf)`` at 250 Hz and the fixations they hold.

    Fixations of 240-400 ms at random places of a 30 x 25 deg screen, joined by saccades of 6-12 deg
    with a cosine position profile lasting 2.2 ms/deg + 21 ms (the main sequence), Gaussian noise on
    every sample, 10 isolated samples at confidence 0.3, and in fixation ``blink_in`` a blink (37
    samples = 148 ms at confidence 0) that splits it into two true fixations.
    """
    rng = np.random.default_rng(seed)
    samples: list[tuple[float, float, float, float]] = []
    truth: list[TrueFixation] = []
    pos = np.array([10.0, 8.0])
    i = 0

    def emit(p: np.ndarray, conf: float = 1.0) -> None:
        nonlocal i
        noisy = p + rng.normal(0.0, noise_deg, 2)
        samples.append((t0 + i * DT, noisy[0] * PX_PER_DEG, noisy[1] * PX_PER_DEG, conf))
        i += 1

    for k in range(n_fix):
        # 240-400 ms; the blinked one 440 ms, so both halves outlast the minimum durations
        n = 110 if k == blink_in else int(rng.integers(60, 100))
        start = t0 + i * DT
        blink = range(n // 2 - 18, n // 2 + 19) if k == blink_in else range(0)
        for j in range(n):
            emit(pos, 0.0 if j in blink else 1.0)
        if k == blink_in:
            truth.append(TrueFixation(start, start + (blink.start - 1) * DT, *pos))
            truth.append(TrueFixation(start + blink.stop * DT, start + (n - 1) * DT, *pos))
        else:
            truth.append(TrueFixation(start, start + (n - 1) * DT, *pos))
        if k == n_fix - 1:
            break
        while True:
            angle = rng.uniform(0, 2 * math.pi)
            target = pos + rng.uniform(6, 12) * np.array([math.cos(angle), math.sin(angle)])
            if 1 < target[0] < 29 and 1 < target[1] < 24:
                break
        amp = float(np.linalg.norm(target - pos))
        steps = max(2, round((0.0022 * amp + 0.021) / DT))
        for s in range(1, steps):
            emit(pos + (1 - math.cos(math.pi * s / steps)) / 2 * (target - pos))
        pos = target
    # Isolated dropped samples (4 ms holes) inside fixations must not split them.
    for idx in rng.choice(len(samples), size=10, replace=False):
        t, x, y, _ = samples[idx]
        samples[idx] = (t, x, y, 0.3)
    return samples, truth


class RecordingSink:
    """Records what it gets; SinkUnavailable while ``down`` is set, SinkRejected for ``reject_seqs``."""

    def __init__(self, reject_seqs: set[int] | None = None, delay_s: float = 0.0) -> None:
        self.received: list[tuple[str, OutgoingFixation]] = []
        self.down = threading.Event()
        self.reject_seqs = set(reject_seqs or ())
        self.attempts = 0
        self.delay_s = delay_s
        self._lock = threading.Lock()

    def __call__(self, stream_id: str, fix: OutgoingFixation) -> PostResult:
        with self._lock:
            self.attempts += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.down.is_set():
            raise SinkUnavailable("ConnectError: test server down")
        if fix.seq in self.reject_seqs:
            raise SinkRejected("PatchError: test rejection")
        with self._lock:
            self.received.append((stream_id, fix))
            return PostResult(step=len(self.received), error=0.5)

    @property
    def seqs(self) -> list[int]:
        with self._lock:
            return [fix.seq for _, fix in self.received]

    @property
    def fixations(self) -> list[OutgoingFixation]:
        with self._lock:
            return [fix for _, fix in self.received]


def write_lsl_config(directory: Path) -> Path:
    """Write an ``lsl_api.cfg`` that keeps liblsl on this machine; return its path (for ``LSLAPICFG``).

    The keys are liblsl's (``src/api_config.cpp``): no IPv6; ``ResolveScope = machine`` with the
    multicast address list replaced by 127.0.0.1 (``AddressesOverride``) and a TTL of 0, so stream
    queries go to loopback only; ``KnownPeers = {127.0.0.1}`` makes the resolver also ask the local
    outlets' unicast ports directly; a ``SessionID`` unique to this test run hides any other LSL
    outlet on the machine (and ours from it).
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "lsl_api.cfg"
    path.write_text(
        "[ports]\nIPv6 = disable\n\n"
        "[multicast]\nResolveScope = machine\nListenAddress = 127.0.0.1\nMachineAddresses = {127.0.0.1}\n"
        "AddressesOverride = {127.0.0.1}\nTTLOverride = 0\nInterfaces = {127.0.0.1}\n\n"
        f"[lab]\nKnownPeers = {{127.0.0.1}}\nSessionID = foveate-test-{uuid.uuid4().hex[:12]}\n\n"
        "[log]\nlevel = -3\n"
    )
    return path


def serve_on(port: int, workdir: Path, *, timeout: float = 120.0) -> FoveateProcess:
    """``foveate serve --port PORT`` (small model, no checkpoints); returns once ``/readyz`` answers 200.

    A fresh log name per start: the bridge tests restart a server on the same port.
    """
    return _serve_on(port, workdir, timeout=timeout, name=f"serve-{port}-{time.monotonic_ns()}")


def kill_hard(proc: FoveateProcess) -> None:
    """SIGKILL: a crash, no graceful shutdown."""
    proc.process.kill()
    proc.process.wait(timeout=10)
    proc.stop()  # closes its log


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def stream_info(url: str, stream_id: str) -> dict[str, object] | None:
    """``GET /v1/streams/{id}`` as a dict, or None when the server does not know the stream."""
    response = httpx.get(f"{url}/v1/streams/{stream_id}", timeout=10.0)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    data: dict[str, object] = response.json()
    return data
