"""The worker's checkpoints: learning pauses for the snapshot only, the write goes on beside it."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from learner.checkpoint import MANIFEST, read_state
from service import metrics
from service.messages import Control
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


def test_a_checkpoint_command_is_answered_after_its_commit_and_learning_goes_on_meanwhile(
    tmp_path: Path,
) -> None:
    run = Running(checkpoint_path=tmp_path / "ckpt.pt")
    held, release = threading.Event(), threading.Event()

    def hold(stage: str) -> None:
        if stage == "commit":  # every file written, the manifest not yet
            held.set()
            assert release.wait(60)

    async def go() -> tuple[list[dict[str, Any]], bool, dict[str, Any]]:
        pending = asyncio.ensure_future(run.broker.command(Control("checkpoint", {}), 60.0))
        assert await asyncio.to_thread(held.wait, 60)
        fixes = [_fix("a", 2), _fix("b", 2)]
        await run.broker.submit(fixes, wait=True)
        out = [await run.broker.result(f.request_id or "", 30.0) for f in fixes]
        answered_early = pending.done()
        release.set()
        return out, answered_early, await pending

    try:
        assert all(o["ok"] for o in run.send([_fix("a", 1), _fix("b", 1)]))
        run.worker.checkpoint_stage = hold
        out, answered_early, reply = run.loop.run_until_complete(go())
        assert [(o["ok"], o["step"]) for o in out] == [(True, 2), (True, 2)]  # learned during the write
        assert not answered_early  # the command waited for its commit
        assert reply["ok"] and reply["checkpoint"]["streams_written"] == 2
        saved = read_state(tmp_path / "ckpt.pt")  # the snapshot's moment: before the second fixations
        assert saved["extra"]["service"]["records"]["a"]["fixations"] == 1
    finally:
        release.set()
        run.close()
