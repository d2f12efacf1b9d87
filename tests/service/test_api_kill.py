"""SIGKILL of the API mid-request: the SDK sends the fixation again, and it is applied exactly once.

As the product runs: a real redis-server, ``foveate worker`` and ``foveate api`` as separate
processes, the SDK as the client. One stream sends seq 0-5; the API is SIGKILLed (and restarted on
the same port) at three points of a request's life:

- **before it queued the fixation**: the API is stopped (SIGSTOP) while the request arrives;
- **after it queued the fixation, before the worker applied it**: the worker is stopped until the
  entry is in ``foveate:fixations``;
- **after the worker applied it, before the API answered**: the API is stopped once the entry is
  queued, the worker applies it, then the API dies.

Each time the client's connection drops or is refused; the SDK re-sends the same body (the same
seq). Afterwards every seq has exactly one "applied" result in ``foveate:results`` and the stream
has taken 6 fixations: none lost, none applied twice (before issue 16 the retry was applied again).
Processes are stopped and continued on conditions read from Redis, never on sleeps.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from clients import sdk
from tests.service._support import ServiceProcess, free_port

pytestmark = pytest.mark.slow  # three API starts and a worker with torch: about 30 s on 2 cores

PATCHES = [np.random.default_rng(seq).integers(0, 256, (32, 32, 3), dtype=np.uint8) for seq in range(6)]
POLICY = sdk.RetryPolicy(max_retries=200, backoff=0.05, max_backoff=0.5, jitter=0.0, max_total_wait=180.0)


def _until(done: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


class Stack:
    def __init__(self, redis_url: str, tmp: Path, processes: list[ServiceProcess]) -> None:
        self.r = redis.Redis.from_url(redis_url)
        self.tmp, self.processes = tmp, processes
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "FOVEATE_REDIS_URL": redis_url,
            "FOVEATE_PORT": str(self.port),
            "FOVEATE_CHECKPOINT_PATH": "",
            "FOVEATE_WORKER_METRICS_PORT": "0",
            "FOVEATE_TORCH_THREADS": "1",
            "FOVEATE_SYNC_TIMEOUT_S": "120",
            # a stopped worker must still count as alive: the API refuses wait=true without one
            "FOVEATE_HEARTBEAT_TIMEOUT_S": "600",
        }
        self.apis = 0
        self.worker = self._start("worker")
        self.api = self.start_api()

    def _start(self, command: str) -> ServiceProcess:
        proc = ServiceProcess([command], self.env, self.tmp / f"{command}-{len(self.processes)}.log")
        self.processes.append(proc)
        return proc

    def start_api(self) -> ServiceProcess:
        self.api = self._start("api")
        self.api.wait_http(self.url + "/readyz")
        return self.api

    def kill_api(self) -> None:
        assert self.api.stop(signal.SIGKILL) == -signal.SIGKILL

    def entries(self, stream: str, seq: int, **fields: str) -> int:
        """Entries of ``stream`` for this seq whose fields include ``fields``."""
        want = {"seq": str(seq), **fields}
        found = 0
        for _, raw in self.r.xrange(stream):
            got = {k.decode(): v.decode(errors="replace") for k, v in raw.items() if k != b"raw"}
            found += all(got.get(k) == v for k, v in want.items())
        return found


def _unread_bytes(port: int) -> int:
    """Bytes received but not yet read by the sockets listening or accepted on ``port`` (Linux)."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                total += int(fields[4].split(":")[1], 16)  # tx_queue:rx_queue
    return total


def _send_in_thread(client: sdk.FoveateClient, seq: int) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def send() -> None:
        try:
            out["result"] = client.post_fixation("rig", PATCHES[seq], seq=seq, reset=seq == 0)
        except Exception as exc:  # reported by the test, not swallowed
            out["error"] = exc

    thread = threading.Thread(target=send)
    thread.start()
    return thread, out


def _finish(thread: threading.Thread, out: dict[str, Any]) -> Any:
    thread.join(180.0)
    assert "error" not in out, out.get("error")
    return out["result"]


def test_a_killed_api_loses_nothing_and_applies_nothing_twice(
    redis_server: str, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    stack = Stack(redis_server, tmp_path, processes)
    events: list[sdk.RetryEvent] = []
    client = sdk.FoveateClient(stack.url, retry=POLICY, timeout=150.0, encoding="raw", on_retry=events.append)
    results = {seq: client.post_fixation("rig", PATCHES[seq], seq=seq, reset=seq == 0) for seq in (0, 1)}

    # seq 2: killed after queueing it, before the worker applied it
    os.kill(stack.worker.process.pid, signal.SIGSTOP)
    thread, out = _send_in_thread(client, 2)
    _until(lambda: stack.entries("foveate:fixations", 2) == 1, "the API did not queue seq 2")
    stack.kill_api()
    stack.start_api()
    os.kill(stack.worker.process.pid, signal.SIGCONT)
    results[2] = _finish(thread, out)

    # seq 3: killed after the worker applied it, before the API answered
    os.kill(stack.worker.process.pid, signal.SIGSTOP)
    thread, out = _send_in_thread(client, 3)
    _until(lambda: stack.entries("foveate:fixations", 3) == 1, "the API did not queue seq 3")
    os.kill(stack.api.process.pid, signal.SIGSTOP)
    os.kill(stack.worker.process.pid, signal.SIGCONT)
    _until(lambda: stack.entries("foveate:results", 3, status="applied") == 1, "seq 3 was not applied")
    stack.kill_api()
    stack.start_api()
    results[3] = _finish(thread, out)

    # seq 4: killed before it could queue it (stopped while the request arrives)
    os.kill(stack.api.process.pid, signal.SIGSTOP)
    thread, out = _send_in_thread(client, 4)
    _until(lambda: _unread_bytes(stack.port) > 0, "the request did not reach the stopped API")
    stack.kill_api()
    stack.start_api()
    results[4] = _finish(thread, out)

    results[5] = client.post_fixation("rig", PATCHES[5], seq=5)

    assert [results[seq].step for seq in range(6)] == [1, 2, 3, 4, 5, 6]
    assert results[2].status == "duplicate" and results[3].status == "duplicate", results
    applied = Counter(
        int(fields[b"seq"])
        for _, fields in stack.r.xrange("foveate:results")
        if fields[b"status"] == b"applied"
    )
    assert applied == {seq: 1 for seq in range(6)}  # each exactly once
    info = client.stream("rig")
    assert (info.fixations, info.step, info.last_seq) == (6, 6, 5)
    # the SDK did retry: dropped connections or refusals of the dead API
    assert any(e.reason.startswith(("RemoteProtocolError", "ConnectError", "ReadError")) for e in events)
