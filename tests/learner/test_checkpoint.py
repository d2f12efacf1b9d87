"""The checkpoint store (learner/checkpoint.py): bit-identical restores, incremental writes, commits
that a crash cannot tear, and a snapshot that the tick loop may run past (learner/snapshot.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from learner import RFPLearner
from learner.checkpoint import (
    MANIFEST,
    STREAMS,
    load_checkpoint,
    read_checkpoint,
    read_state,
    save_checkpoint,
    take_snapshot,
    write_snapshot,
)
from learner.config import ModelConfig
from learner.errors import CheckpointError
from learner.snapshot import cloned

M = 10


def cfg() -> ModelConfig:
    return ModelConfig(trunk="none", in_features=M, n_units=8, embed_dim=5, pred_hidden=7, lr=1e-2, seed=3)


def feats(seed: int, b: int) -> torch.Tensor:
    return torch.randn(b, M, generator=torch.Generator().manual_seed(seed))


def play(learner: RFPLearner, ids: list[str], ticks: int, seed: int = 0) -> None:
    """Ticks of two or three streams at a time, so that some streams stay idle (and spill)."""
    for t in range(ticks):
        k = 2 + t % 2
        chosen = [ids[(3 * t + j) % len(ids)] for j in range(k)]
        learner.tick_features(chosen, feats(seed + t, k))


def everything(learner: RFPLearner) -> dict[str, Any]:
    """Weights, optimizer, counters and every stream's rows (by id), copied."""
    sd = cloned(learner.state_dict(streams=False))
    sd["streams"] = {sid: learner.states.row(sid) for sid in learner.stream_ids()}
    return sd


def assert_equal(a: Any, b: Any, where: str = "") -> None:
    """Bit-identical: tensors by torch.equal, containers item by item."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(set(a) ^ set(b))[:5])
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def capped(tmp_path: Path) -> RFPLearner:
    learner = RFPLearner(cfg())
    learner.states.chunk = 2
    learner.states.limit(3, tmp_path / "spill")
    return learner


def stream_files(path: Path) -> set[str]:
    return {f.name for f in (path / STREAMS).iterdir()}


def test_restore_is_bit_identical_spilled_streams_too(tmp_path: Path) -> None:
    ids = [f"s{i}" for i in range(7)]
    learner = capped(tmp_path)
    play(learner, ids, 40)
    assert learner.states.spilled == 4  # most streams are on disk, and a checkpoint holds them
    want = everything(learner)
    info = save_checkpoint(tmp_path / "ck", learner, extra={"seq": {"s0": 3}})
    assert info["streams_written"] == 7 and len(stream_files(tmp_path / "ck")) == 7
    spilled = [sid for sid in ids if not isinstance(learner.states.location(sid), int)]
    learner.stream_info(spilled[0])  # read back from disk (another stream spills): nothing changed
    assert isinstance(learner.states.location(spilled[0]), int)  # resident again
    assert save_checkpoint(tmp_path / "ck", learner, extra={"seq": {"s0": 3}})["streams_written"] == 0
    for other in (RFPLearner(cfg()), capped(tmp_path / "other")):
        assert load_checkpoint(tmp_path / "ck", other) == {"seq": {"s0": 3}}
        assert_equal(want, everything(other))
    # and the restored learner goes on as the original does
    play(learner, ids, 5, seed=100)
    play(other, ids, 5, seed=100)
    assert_equal(everything(learner), everything(other))


def test_a_second_checkpoint_writes_only_the_changed_streams(tmp_path: Path) -> None:
    ids = [f"s{i}" for i in range(10)]
    learner = RFPLearner(cfg())
    learner.tick_features(ids, feats(0, 10))
    first = save_checkpoint(tmp_path / "ck", learner)
    assert first["streams_written"] == 10
    kept = stream_files(tmp_path / "ck")
    learner.tick_features(["s1"], feats(1, 1))  # one stream learns, one is reset, one deleted
    learner.reset("s2")
    learner.drop("s3")
    learner.stream_info("s4"), learner.prediction("s5")  # reading changes nothing
    second = save_checkpoint(tmp_path / "ck", learner)
    assert second["streams_written"] == 2
    files = stream_files(tmp_path / "ck")
    assert len(files) == 9 and len(files - kept) == 2  # the two rewritten, s3's gone, 7 as they were
    per_stream = (first["bytes"] - second["bytes"]) / 1  # s3's file: what one stream costs
    assert second["bytes_written"] < first["bytes_written"] - 7 * per_stream
    again = RFPLearner(cfg())
    load_checkpoint(tmp_path / "ck", again)
    assert_equal(everything(learner), everything(again))


def test_a_write_that_fails_before_its_manifest_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    ids = ["a", "b", "c"]
    learner = RFPLearner(cfg())
    play(learner, ids, 6)
    save_checkpoint(tmp_path / "ck", learner, extra={"n": 1})
    before = everything(learner)
    play(learner, ids, 6, seed=50)

    def fail(stage: str) -> None:
        if stage == "commit":  # every stream file and the core file are written: only the manifest is not
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_snapshot(take_snapshot(tmp_path / "ck", learner, extra={"n": 2}), fail)
    restored = RFPLearner(cfg())
    assert load_checkpoint(tmp_path / "ck", restored) == {"n": 1}
    assert_equal(before, everything(restored))
    # the next checkpoint writes every stream again (the failed one took their changes) and cleans up
    info = save_checkpoint(tmp_path / "ck", learner, extra={"n": 3})
    assert info["streams_written"] == 3 and len(stream_files(tmp_path / "ck")) == 3
    assert sorted(f.name for f in (tmp_path / "ck").iterdir()) == sorted(
        [MANIFEST, STREAMS, read_checkpoint(tmp_path / "ck")["core"]]
    )
    load_checkpoint(tmp_path / "ck", restored)
    assert_equal(everything(learner), everything(restored))


_KILLED_WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.learner.test_checkpoint import RFPLearner, cfg, everything, play
from learner.checkpoint import save_checkpoint, take_snapshot, write_snapshot
path = {path!r}
learner = RFPLearner(cfg())
play(learner, ["a", "b", "c", "d"], 8)
save_checkpoint(path, learner)
torch.save(everything(learner), {expected!r})
play(learner, ["a", "b", "c", "d"], 8, seed=40)

def hold(stage):
    if stage == "commit":
        print("commit", flush=True)
        sys.stdin.readline()  # killed here

write_snapshot(take_snapshot(path, learner), hold)
"""


def test_a_writer_killed_before_its_manifest_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[2])
    script = _KILLED_WRITER.format(root=root, path=str(tmp_path / "ck"), expected=str(tmp_path / "want.pt"))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "commit\n"  # new files all written
        proc.kill()
    finally:
        proc.wait()
    assert len(stream_files(tmp_path / "ck")) == 8  # the first generation's and the dead write's
    restored = RFPLearner(cfg())
    load_checkpoint(tmp_path / "ck", restored)
    assert_equal(torch.load(tmp_path / "want.pt", weights_only=True), everything(restored))


def test_ticks_go_on_while_a_write_is_held_and_it_writes_the_snapshot(tmp_path: Path) -> None:
    ids = [f"s{i}" for i in range(6)]
    learner = RFPLearner(cfg())
    learner.states.chunk = 2
    play(learner, ids, 10)
    want = everything(learner)
    snap = take_snapshot(tmp_path / "ck", learner)
    held, release = threading.Event(), threading.Event()

    def hold(stage: str) -> None:
        if stage == "rows":  # before the writer has read a single row
            held.set()
            assert release.wait(60)

    writer = threading.Thread(target=write_snapshot, args=(snap, hold))
    writer.start()
    assert held.wait(60)
    # the loop goes on: ticks, a reset, a deleted chunk whose slots new streams take again
    play(learner, ids, 10, seed=30)
    learner.reset("s1")
    learner.drop("s4"), learner.drop("s5")
    learner.tick_features(["n1", "n2", "s0"], feats(99, 3))
    assert writer.is_alive() and not (tmp_path / "ck" / MANIFEST).exists()  # ticked, the write still held
    now = everything(learner)
    release.set()
    writer.join()
    restored = RFPLearner(cfg())
    load_checkpoint(tmp_path / "ck", restored)
    assert_equal(want, everything(restored))  # the checkpoint is the moment of the snapshot
    with pytest.raises(AssertionError):
        assert_equal(want, now)  # which the ticks did change
    assert_equal(now, everything(learner))  # and the snapshot changed nothing in the learner


def test_read_state_gives_every_stream_and_extra(tmp_path: Path) -> None:
    learner = RFPLearner(cfg())
    play(learner, ["a", "b", "c"], 4)
    save_checkpoint(tmp_path / "ck", learner, extra={"k": [1, 2]})
    got = read_state(tmp_path / "ck")
    assert got["extra"] == {"k": [1, 2]} and got["manifest"]["generation"] == 1
    assert_equal({sid: learner.states.row(sid) for sid in ("a", "b", "c")}, got["state"]["streams"])


def test_a_single_file_checkpoint_of_an_older_foveate_is_refused(tmp_path: Path) -> None:
    old = tmp_path / "foveate.pt"
    torch.save({"format": "foveate-checkpoint", "version": 3}, old)
    learner = RFPLearner(cfg())
    with pytest.raises(CheckpointError, match="single-file checkpoint of an older foveate"):
        load_checkpoint(old, learner)
    with pytest.raises(CheckpointError, match="Move the file away"):
        save_checkpoint(old, learner)
