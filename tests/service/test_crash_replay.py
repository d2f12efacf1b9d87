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
import math
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
from tests.service._support import ServiceProcess, small_settings

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
    elif isinstance(a, float) and math.isnan(a):  # NaN: a score not computed, in both runs
        assert isinstance(b, float) and math.isnan(b), (where, a, b)
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


# ---------------------------------------------------------------- resets and deletes: the journal


def _phase(rng: np.random.Generator, tag: str, plan: dict[str, range]) -> list[dict[str, Any]]:
    """Fixations of the streams in ``plan`` (stream -> seqs), interleaved; the second is retried."""
    out: list[dict[str, Any]] = []
    for i in range(max(len(seqs) for seqs in plan.values())):
        for sid, seqs in plan.items():
            if i < len(seqs):
                patch = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                out.append({"stream_id": sid, "seq": seqs[i], "raw": patch.tobytes(), "shape": "32,32,3",
                            "request_id": f"{tag}-{sid}-{seqs[i]}"})  # fmt: skip
    out.insert(len(out) // 2, {**out[1], "request_id": f"{tag}-retry"})
    return out


def _script() -> list[list[dict[str, Any]] | list[tuple[str, str]]]:
    """Phases of fixations and the commands sent between them, each once the phase is answered.

    s0 is reset twice with fixations between; s1 deleted, fed again as a new stream, deleted again
    with nothing after; s3 reset with no fixation after it; s2 reset between fixations."""
    rng = np.random.default_rng(7)
    return [
        _phase(rng, "p0", {f"s{k}": range(0, 4) for k in range(4)}),
        _phase(rng, "p1", {f"s{k}": range(4, 8) for k in range(4)}),
        [("reset", "s0"), ("delete", "s1"), ("reset", "s3")],
        _phase(rng, "p2", {"s0": range(8, 11), "s1": range(0, 3), "s2": range(8, 11)}),
        [("reset", "s0"), ("delete", "s1"), ("reset", "s2")],
        _phase(rng, "p3", {"s0": range(11, 13), "s2": range(11, 13)}),
    ]


class Scripted(Run):
    """A run whose fixations are XADDed phase by phase, with commands (signed, as the API sends them)
    between phases."""

    def __init__(self, url: str, tmp: Path, processes: list[ServiceProcess]) -> None:
        self.r = redis.Redis.from_url(url)
        self.tmp, self.processes, self.incarnations = tmp, processes, 0
        tmp.mkdir(parents=True)
        self.ckpt = tmp / "ckpt.pt"
        self.env = {
            "FOVEATE_REDIS_URL": url,
            "FOVEATE_CHECKPOINT_PATH": str(self.ckpt),
            "FOVEATE_CHECKPOINT_INTERVAL_S": "3600",  # none due: a checkpoint only when stopped
            "FOVEATE_MAX_BATCH": "1",
            "FOVEATE_TORCH_THREADS": "1",
            "FOVEATE_RESULT_TTL_S": "3600",
            "FOVEATE_WORKER_METRICS_PORT": "0",
        }
        self.settings = small_settings(redis_url=url)  # signs commands with the workers' secret
        self.sent: list[dict[str, Any]] = []

    def feed(self, proc: ServiceProcess, fixations: list[dict[str, Any]]) -> None:
        """XADD ``fixations`` and wait until each is answered."""
        pipe = self.r.pipeline()
        for fields in fixations:
            pipe.xadd("foveate:fixations", fields)  # type: ignore[arg-type]
        pipe.execute()
        self.sent.extend(fixations)
        keys = [f"foveate:result:{f['request_id']}" for f in fixations]
        self.wait(proc, lambda: all(self.r.llen(k) for k in keys), "a phase was not answered")

    def command(self, name: str, stream_id: str) -> dict[str, Any]:
        from service.messages import Control
        from service.redis_broker import RedisBroker

        async def ask() -> dict[str, Any]:
            broker = RedisBroker(self.settings)
            try:
                return await broker.command(Control(name, {"stream_id": stream_id}), 60.0)
            finally:
                await broker.close_api()

        import asyncio

        return asyncio.run(ask())

    def play(self, proc: ServiceProcess, steps: list[Any]) -> None:
        for step in steps:
            if step and isinstance(step[0], tuple):
                for name, sid in step:
                    assert self.command(name, sid)["ok"], (name, sid)
            else:
                self.feed(proc, step)

    def generation(self) -> int:
        from learner.checkpoint import MANIFEST

        return int(json.loads((self.ckpt / MANIFEST).read_text())["generation"])

    def end(self, proc: ServiceProcess) -> dict[str, Any]:
        """A last fixation of a new stream: answered once every entry before it has been; then SIGTERM."""
        patch = np.random.default_rng(99).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        self.feed(proc, [{"stream_id": "z", "seq": 0, "raw": patch.tobytes(), "shape": "32,32,3",
                          "request_id": "z-0"}])  # fmt: skip
        assert proc.stop(signal.SIGTERM) == 0, proc.tail()
        return read_state(self.ckpt)


_WALL_CLOCK_OR_ENTRY = {"created_at", "updated_at", "last_entry_id", "last_read_entry_id"}


def test_journaled_resets_and_deletes_replay_at_their_place_after_a_sigkill(
    redis_server_factory: Callable[[], Any], tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    # The commands are answered from the journal while no checkpoint after the first is taken
    # (interval 3600 s), then the worker is SIGKILLed: the restart restores that checkpoint, from
    # before the commands, and must apply each journaled command between the same two fixations.
    script = _script()
    reference = Scripted(redis_server_factory().url, tmp_path / "reference", processes)
    proc = reference.start()
    reference.play(proc, script)
    ref = reference.end(proc)

    run = Scripted(redis_server_factory().url, tmp_path / "crashed", processes)
    proc = run.start()
    run.play(proc, script[:1])
    assert proc.stop(signal.SIGTERM) == 0, proc.tail()  # the checkpoint to restore: after phase 0
    before = run.generation()
    proc = run.start()  # restores it; no checkpoint is due for an hour
    run.play(proc, script[1:])
    assert run.generation() == before  # every command was answered without a checkpoint
    assert run.r.xlen("foveate:journal") == 6
    assert proc.stop(signal.SIGKILL) == -signal.SIGKILL
    run.env["FOVEATE_CHECKPOINT_INTERVAL_S"] = "0.2"  # checkpoints (and trims) during the re-read
    run.interrupt(8, signal.SIGKILL)
    proc = run.start()
    got = run.end(proc)

    _equal(ref["state"]["weights"], got["state"]["weights"], "weights")
    _equal(ref["state"]["optimizer"]["state"], got["state"]["optimizer"]["state"], "optimizer")
    _equal(ref["state"]["counters"], got["state"]["counters"], "counters")
    _equal(_streams(ref["state"]), _streams(got["state"]), "streams")
    want, have = ref["extra"]["service"]["records"], got["extra"]["service"]["records"]
    assert sorted(have) == ["s0", "s2", "s3", "z"]  # s1 deleted twice
    for sid in want:
        _equal({k: v for k, v in want[sid].items() if k not in _WALL_CLOCK_OR_ENTRY},
               {k: v for k, v in have[sid].items() if k not in _WALL_CLOCK_OR_ENTRY}, sid)  # fmt: skip
    assert (have["s0"]["resets"], have["s3"]["resets"], have["s0"]["step"]) == (2, 1, 2)
    assert not got["extra"]["service"]["journal"]["pending"]
    for fields in run.sent:  # every answer any incarnation gave equals the uninterrupted run's
        key = f"foveate:result:{fields['request_id']}"
        (first,) = [json.loads(x) for x in reference.r.lrange(key, 0, -1)]
        for reply in [json.loads(x) for x in run.r.lrange(key, 0, -1)]:
            assert reply["status"] in (first["status"], "duplicate"), reply
            assert {k: reply[k] for k in _SCORES} == {k: first[k] for k in _SCORES}, key
