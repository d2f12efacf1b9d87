"""The worker's checkpoints: learning pauses for the snapshot only, the write goes on beside it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from learner.checkpoint import MANIFEST, read_state
from service import metrics
from tests.service.test_worker import Running, _fix


def _sample(name: str) -> float:
    return metrics.WORKER_REGISTRY.get_sample_value(name) or 0.0


def _until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_fixations_are_learned_while_a_checkpoint_is_written(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    run = Running(checkpoint_path=path)
    worker = run.worker
    held, release = threading.Event(), threading.Event()

    def hold(stage: str) -> None:
        if stage == "rows":  # the snapshot is taken; not one stream file written yet
            held.set()
            assert release.wait(60)

    try:
        assert all(o["ok"] for o in run.send([_fix("a", 1), _fix("b", 1)]))
        stalls, written = (
            _sample("foveate_checkpoint_stall_seconds_count"),
            _sample("foveate_checkpoints_total"),
        )
        worker.checkpoint_stage = hold
        assert worker.checkpoint(wait=False) is None  # the periodic kind: returns before the write
        assert held.wait(60)
        out = run.send([_fix("a", 2), _fix("b", 2)])  # learned while the write is held
        assert [(o["ok"], o["step"]) for o in out] == [(True, 2), (True, 2)]
        assert worker.checkpoint(wait=False) is None  # coalesced into the write in flight
        assert not (path / MANIFEST).exists()
        release.set()
        _until(lambda: (path / MANIFEST).exists(), "the held checkpoint never committed")
        _until(lambda: worker.last_checkpoint is not None, "the commit was not recorded")
        assert worker.last_checkpoint is not None and worker.last_checkpoint["generation"] == 1
        saved = read_state(path)  # the moment of the snapshot, not of the commit
        records = saved["extra"]["service"]["records"]
        assert records["a"]["fixations"] == records["b"]["fixations"] == 1
        assert int(saved["state"]["streams"]["a"]["step"]) == 1
        assert _sample("foveate_checkpoint_stall_seconds_count") == stalls + 1
        assert _sample("foveate_checkpoints_total") == written + 1  # the coalesced one wrote nothing
        assert _sample("foveate_checkpoint_bytes") >= _sample("foveate_checkpoint_written_bytes") > 0
        worker.checkpoint_stage = None
        explicit = run.command("checkpoint")["checkpoint"]  # returns after its commit
        assert explicit["generation"] == 2 and explicit["streams_written"] == 2
        assert read_state(path)["extra"]["service"]["records"]["a"]["fixations"] == 2
    finally:
        release.set()
        run.close()
