"""Exactly once across crashes: a replay over Redis, the worker killed and restarted under new names.

Short streams of fixations are XADDed to a real redis-server, as rigs would. ``foveate worker`` runs
as a subprocess and is SIGKILLed (and once stopped with SIGTERM) at several points; each restart has
another consumer name, so no entry is re-read because of its owner. When everything is answered, the
final checkpoint must be bit-identical on the CPU to that of a run that was never interrupted: the
weights, the optimizer, every stream's state, and each stream's count of applied fixations (none lost
or applied twice). Every reply that any incarnation gave must also equal the uninterrupted run's.

The worker takes one fixation per tick (``FOVEATE_MAX_BATCH=1``), so both runs tick the same
fixations in the same order; where the kills fall depends on timing, what is checked does not.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch

from learner.checkpoint import read_state
from tests.service._support import ServiceProcess

pytestmark = pytest.mark.slow  # a dozen worker starts with torch: about 100 s on 2 cores

STREAMS, PER_STREAM = 3, 16
RESULTS = "foveate:results"


def _fixations() -> list[dict[str, Any]]:
    """The replay: streams interleaved, a new scene (reset) in the middle of each, and now and then a
    rig's retry of a fixation it sent a little earlier (same seq and image, another request id)."""
    rng = np.random.default_rng(16)
    out = []
    for i in range(PER_STREAM):
        for k in range(STREAMS):
            patch = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            out.append({"stream_id": f"s{k}", "seq": i, "reset": int(i in (0, PER_STREAM // 2)),
                        "raw": patch.tobytes(), "shape": "32,32,3", "request_id": f"s{k}-{i}"})  # fmt: skip
            if len(out) % 11 == 0:
                out.append({**out[-5], "request_id": f"retry-{len(out)}"})
    return out


class Run:
    """One Redis and one checkpoint path, and the worker processes that share them."""

    def __init__(self, url: str, tmp: Path, processes: list[ServiceProcess]) -> None:
        self.r = redis.Redis.from_url(url)
        self.tmp, self.processes, self.incarnations = tmp, processes, 0
        tmp.mkdir(parents=True)
        self.ckpt = tmp / "ckpt.pt"
        self.env = {
            "FOVEATE_REDIS_URL": url,
            "FOVEATE_CHECKPOINT_PATH": str(self.ckpt),
            "FOVEATE_CHECKPOINT_INTERVAL_S": "0.2",  # checkpoints between the kills, wherever they fall
            "FOVEATE_MAX_BATCH": "1",
            "FOVEATE_TORCH_THREADS": "1",
            "FOVEATE_RESULT_TTL_S": "3600",
            "FOVEATE_WORKER_METRICS_PORT": "0",
        }
        pipe = self.r.pipeline()
        for fields in _fixations():
            pipe.xadd("foveate:fixations", fields)  # type: ignore[arg-type]
        pipe.execute()

    def start(self) -> ServiceProcess:
        self.incarnations += 1
        name = f"worker-{self.incarnations}"  # a new consumer name at every restart
        proc = ServiceProcess(
            ["worker"], {**self.env, "FOVEATE_CONSUMER_NAME": name}, self.tmp / f"{name}.log"
        )
        self.processes.append(proc)
        return proc

    def wait(self, proc: ServiceProcess, done: Callable[[], bool], what: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if proc.process.poll() is not None:
                raise AssertionError(f"the worker exited with {proc.process.returncode}:\n{proc.tail()}")
            assert time.monotonic() < deadline, f"{what} within {timeout} s:\n{proc.tail()}"
            time.sleep(0.02)

    def interrupt(self, after_results: int, sig: int) -> None:
        """Start a worker, let it publish ``after_results`` results, then send ``sig``."""
        proc = self.start()
        start = self.r.xlen(RESULTS)
        self.wait(proc, lambda: self.r.xlen(RESULTS) >= start + after_results, "no progress")
        code = proc.stop(sig)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), proc.tail()

    def finish(self) -> dict[str, Any]:
        """Start a worker, wait until every fixation is answered and acknowledged, stop it (SIGTERM
        drains and checkpoints: exit 0) and return the checkpoint."""
        proc = self.start()
        keys = [f"foveate:result:{f['request_id']}" for f in _fixations()]

        def answered() -> bool:
            if not all(self.r.llen(k) for k in keys):
                return False  # (also: the worker may not have made its consumer group yet)
            return self.r.xpending("foveate:fixations", "foveate-workers")["pending"] == 0

        self.wait(proc, answered, "not every fixation was answered")
        assert proc.stop(signal.SIGTERM) == 0, proc.tail()
        return read_state(self.ckpt)

    def replies(self) -> dict[str, list[dict[str, Any]]]:
        out = {}
        for fields in _fixations():
            raw = self.r.lrange(f"foveate:result:{fields['request_id']}", 0, -1)
            out[fields["request_id"]] = [json.loads(item) for item in raw]
        return out


def _equal(a: Any, b: Any, where: str) -> None:
    """Bit-identical: tensors by torch.equal, containers item by item, the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _streams(state: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Each stream's state tensors by stream id (one file per stream in the checkpoint)."""
    return dict(state["streams"])


_SCORES = ("stream_id", "seq", "step", "error", "repeat_error", "skill", "skipped", "running_error",
           "updates_applied", "gap")  # fmt: skip


def _check_against(reference: Run, ref: dict[str, Any], run: Run, got: dict[str, Any]) -> None:
    _equal(ref["state"]["weights"], got["state"]["weights"], "weights")
    _equal(ref["state"]["optimizer"]["state"], got["state"]["optimizer"]["state"], "optimizer")
    _equal(ref["state"]["counters"], got["state"]["counters"], "counters")
    _equal(_streams(ref["state"]), _streams(got["state"]), "streams")
    records = got["extra"]["service"]["records"]
    assert sorted(records) == [f"s{k}" for k in range(STREAMS)]
    for sid, rec in records.items():  # each fixation applied once: none lost, none twice
        assert (rec["fixations"], rec["last_seq"]) == (PER_STREAM, PER_STREAM - 1), sid
    want = reference.replies()
    assert sum(w[0]["status"] == "duplicate" for w in want.values()) == len(want) - STREAMS * PER_STREAM
    for request_id, replies in run.replies().items():
        (first,) = want[request_id]
        assert replies, request_id
        for reply in replies:  # a re-applied fixation answers as it did; a re-read one as a duplicate
            assert reply["status"] in (first["status"], "duplicate"), reply
            assert {k: reply[k] for k in _SCORES} == {k: first[k] for k in _SCORES}, request_id


def _crash_and_compare(
    redis_server_factory: Callable[[], Any], tmp_path: Path, processes: list[ServiceProcess], plan: list[int]
) -> None:
    """``plan``: results to wait for before each interruption; 0 means a SIGTERM after one result."""
    reference = Run(redis_server_factory().url, tmp_path / "reference", processes)
    ref = reference.finish()
    run = Run(redis_server_factory().url, tmp_path / "crashed", processes)
    for after in plan:
        run.interrupt(max(after, 1), signal.SIGTERM if after == 0 else signal.SIGKILL)
    got = run.finish()
    _check_against(reference, ref, run, got)


def test_sigkilled_worker_restarted_under_new_names_learns_bit_identically(
    redis_server_factory: Callable[[], Any], tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    # Ten kills at random points (seeded), one of them almost at once after the start, and a
    # graceful stop (SIGTERM: drain, checkpoint, exit 0) among them. About 100 s on 2 cores.
    rng = random.Random(16)
    plan = [rng.randint(2, 14) for _ in range(10)]
    plan[3], plan[6:6] = 1, [0]
    _crash_and_compare(redis_server_factory, tmp_path, processes, plan)
