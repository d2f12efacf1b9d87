"""A distributed worker's periodic checkpoint, in one process: a gloo group of one rank (a file store),
the in-process broker, a real checkpoint folder. The group's agreement carries a periodic checkpoint
due on a rank's clock (tests/service/test_dist_worker_checkpoint.py covers the command, the stop and
the restarts with real rank processes)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch.distributed as dist

from service.broker import LocalBroker
from service.dist_worker import DistWorker
from tests.service._support import small_settings

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
