"""A distributed worker's checkpoints, in one process: a gloo group of one rank (a file store), a real
checkpoint folder. The group's agreement carries a periodic checkpoint due on a rank's clock (the
in-process broker); a group restored from a single worker's checkpoint hands over the fixations the
worker left unanswered in its Redis input (a real redis-server). tests/service/test_dist_worker_checkpoint.py
and test_dist_repartition.py cover the command, the stop and the restarts with real rank processes."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
import redis
import torch.distributed as dist

from learner.errors import CheckpointError
from service.broker import LocalBroker
from service.dist_launch import rank_settings
from service.dist_worker import DistWorker
from service.redis_broker import RedisBroker
from service.worker import Worker
from tests.service._support import small_settings
from tests.service.test_worker import _reply, _xadd

BOUND_S = 120  # waiting longer than this is a failure, not a slow machine


def _generation(folder: Path) -> int:
    manifest = folder / "manifest.json"
    return int(json.loads(manifest.read_text())["generation"]) if manifest.exists() else 0


def test_a_periodic_checkpoint_due_on_a_rank_is_taken_by_the_group() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "foveate.pt"
        dist.init_process_group(
            "gloo", store=dist.FileStore(str(Path(tmp) / "store"), 1), rank=0, world_size=1
        )
        try:
            settings = small_settings(checkpoint_path=folder, checkpoint_interval_s=0.2)
            worker = DistWorker(settings, LocalBroker(settings))
            worker.start(thread=True)
            deadline = time.monotonic() + BOUND_S
            while _generation(folder) < 2:  # two periodic checkpoints, each agreed and committed
                assert worker.alive and time.monotonic() < deadline, "no periodic checkpoint"
                time.sleep(0.05)
            manifest = json.loads((folder / "manifest.json").read_text())
            assert manifest["ranks"] == 1  # written by the group's checkpoint, not a single worker's
            assert worker.last_checkpoint is not None and worker.last_checkpoint["world_size"] == 1
            worker.stop(checkpoint=False)  # the agreed stop checkpoints once more, in the loop
            assert not worker.alive and _generation(folder) >= 3
        finally:
            dist.destroy_process_group()
        single = Worker(settings, LocalBroker(settings))  # its offsets and records are the ranks'
        with pytest.raises(CheckpointError, match=r"written by a distributed worker of 1 ranks"):
            single.checkpoints.restore()


def test_a_group_restored_from_a_single_worker_learns_what_it_left_unanswered(
    redis_server: str, tmp_path: Path
) -> None:
    settings = small_settings(redis_url=redis_server, checkpoint_path=tmp_path / "ckpt.pt",
                              checkpoint_interval_s=3600, max_batch=1)  # fmt: skip
    r = redis.Redis.from_url(redis_server)
    single = Worker(settings, RedisBroker(settings))
    single.start()
    for seq in range(2):
        _xadd(r, "a", seq)
        _xadd(r, "b", seq)
    assert [_reply(r, f"{s}-{seq}")["step"] for s in "ab" for seq in range(2)] == [1, 2, 1, 2]
    single.checkpoint()
    generation = _generation(settings.checkpoint_path)
    _xadd(r, "a", 2)  # learned, then lost: the worker dies before its next checkpoint
    assert _reply(r, "a-2")["step"] == 3
    single.stop(checkpoint=False)
    for seq in (3, 4):  # never read
        _xadd(r, "a", seq)
        _xadd(r, "b", seq - 1)
    ours = rank_settings(settings, 0, 1)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        group = DistWorker(ours, RedisBroker(ours))
        group.start(thread=True)
        try:
            # handed over from foveate:fixations in order, each once, before the new layout's commit
            steps = {f"{s}-{seq}": _reply(r, f"{s}-{seq}")["step"] for s, seq in
                     (("a", 2), ("a", 3), ("a", 4), ("b", 2), ("b", 3))}  # fmt: skip
            assert steps == {"a-2": 3, "a-3": 4, "a-4": 5, "b-2": 3, "b-3": 4}
            manifest = json.loads((settings.checkpoint_path / "manifest.json").read_text())
            assert manifest["ranks"] == 1 and manifest["generation"] > generation
            fields = {"stream_id": "b", "seq": 4, "raw": b"\x07" * 32 * 32 * 3, "shape": "32,32,3",
                      "request_id": "b-4"}  # fmt: skip
            r.xadd("foveate:fixations:0", fields)  # type: ignore[arg-type]
            assert _reply(r, "b-4")["step"] == 5  # then its own shard
            assert r.xpending("foveate:fixations", "foveate-workers")["pending"] == 0
        finally:
            group.stop(checkpoint=False)
    finally:
        dist.destroy_process_group()
