"""Checkpoints of a distributed learner, and restarts with another number of ranks (dist_checkpoint.py).

Real spawned gloo ranks on 127.0.0.1 (``tests/learner/_ckpt_ranks.py``), a tiny float64 RFP learner.
3 ranks play half a schedule, checkpoint, and play on (the uninterrupted run); a second checkpoint
dies between the ranks' files and the manifest, which must leave the first one committed. From that
checkpoint 3 ranks continue bit for bit as the uninterrupted run; 2 ranks (a re-partition) and one
learner hold every stream once, with its rows bit for bit, and end equal to the uninterrupted run up
to the rounding of the gradients' sum, which depends on the number of ranks (learner/distributed.py);
2 ranks also load one learner's checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from learner import dist_checkpoint
from learner.checkpoint import MANIFEST, STREAMS, load_checkpoint, read_state, save_checkpoint
from learner.distributed import join, shared_state
from learner.errors import CheckpointError, ConfigError, DistributedError
from service.shards import rank_of
from tests.learner import _ckpt_ranks, _ranks
from tests.learner.test_distributed import JOIN_BOUND_S, _assert_same


def _spawn(out: Path, world: int, role: str, kind: str = "rfp") -> list[dict[str, Any]]:
    """Run ``world`` ranks in ``role`` to the end; return each one's result (rank order)."""
    return _ranks.run_ranks(
        _ckpt_ranks.rank_main,
        lambda r, port: (r, world, port, str(out), role, kind),
        world,
        lambda r: _ckpt_ranks.result_file(str(out), role, world, r),
        join_bound_s=JOIN_BOUND_S,
    )


def _touched_late() -> set[str]:
    """The streams that tick in the second half: the ones a checkpoint after it writes again."""
    return {sid for tick in _ckpt_ranks.plan()[_ckpt_ranks.HALF :] for sid, _, _ in tick}


def _same_errors(a: dict[str, list[float]], b: dict[str, list[float]], *, exact: bool) -> None:
    for sid, errs in a.items():
        tol = dict(rtol=0.0, atol=0.0) if exact else dict(rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(torch.tensor(errs), torch.tensor(b[sid]), equal_nan=True, **tol)


def _close(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Shared states (with their ``covariances``) equal up to rounding. The whitenings' pending rows
    (``_extra_state``) are compared through the covariances they fold into: groups of other sizes
    observe a tick's rows in another order (rank by rank), so the rows wait in another order."""

    def plain(state: dict[str, Any]) -> dict[str, Any]:
        weights = {k: v for k, v in state["weights"].items() if not k.endswith("_extra_state")}
        return {**state, "weights": weights}

    _assert_same(plain(a["shared"]), plain(b["shared"]), exact=False)
    _assert_same(a["covariances"], b["covariances"], exact=False)


def _union(results: list[dict[str, Any]], key: str) -> dict[str, dict[str, torch.Tensor]]:
    """Every rank's streams' rows in one dict; a stream held by two ranks fails."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for res in results:
        for sid, row in res[key].items():
            assert sid not in out, f"stream {sid} is held by two ranks"
            out[sid] = row
    return out


def _restore(saved: tuple[Path, list[dict[str, Any]]], tmp_path: Path, world: int) -> list[dict[str, Any]]:
    """``world`` ranks restore from a copy of the 3 ranks' checkpoint and play the second half."""
    shutil.copytree(saved[0] / "ck", tmp_path / "ck")
    return _spawn(tmp_path, world, "restore")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """3 ranks: half the schedule, a checkpoint, the other half, a checkpoint that rank 0's crash stops."""
    out = tmp_path_factory.mktemp("three")
    return out, _spawn(out, 3, "save")


@pytest.mark.slow
def test_a_crash_before_the_manifest_keeps_the_previous_checkpoint(
    saved: tuple[Path, list[dict[str, Any]]],
) -> None:
    out, results = saved
    ck = out / "ck"
    for res in results[1:]:  # the others see rank 0 go, in the commit's broadcast
        assert "the checkpoint's commit failed: another rank exited" in res["lost"]
    # the second checkpoint's files were all written (rank 0 dies at the commit stage, after the gather
    # of every rank's outcome), and the manifest still names the first checkpoint's
    assert (ck / "core-2.pt").exists()
    assert len(list((ck / STREAMS).glob("*-2.pt"))) == len(_touched_late())
    back = read_state(ck)
    assert back["manifest"]["generation"] == 1 and back["manifest"]["ranks"] == 3
    at_save = _union(results, "rows_at_save")
    assert sorted(back["state"]["streams"]) == sorted(at_save)
    for sid, row in at_save.items():
        for name, t in back["state"]["streams"][sid].items():
            assert torch.equal(t, row[name]), f"{sid}/{name}"
    assert back["extra"] == {"ranks": [{"rank": r, "half": True} for r in range(3)]}
    _assert_same(back["state"]["weights"], results[0]["shared_at_save"]["weights"], exact=True)


@pytest.mark.slow
def test_the_same_ranks_continue_bit_for_bit(
    saved: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Saving and restoring loses nothing: 3 ranks restored end exactly as the 3 that never stopped."""
    whole = saved[1]
    results = _restore(saved, tmp_path, 3)
    for res, ref in zip(results, whole, strict=True):
        assert res["rows_at_load"].keys() == ref["rows_at_save"].keys()
        _assert_same(res["rows_at_load"], ref["rows_at_save"], exact=True)
        _assert_same(res["shared"], ref["shared"], exact=True)
        _assert_same(res["rows"], ref["rows"], exact=True)
        assert res["errors"].keys() == ref["errors"].keys()
        _same_errors(res["errors"], ref["errors"], exact=True)
        assert res["extras"] == [{"rank": r, "half": True} for r in range(3)]


@pytest.mark.slow
def test_three_ranks_restart_as_two(saved: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    whole = saved[1]
    results = _restore(saved, tmp_path, 2)
    # every stream once, on the rank the 2-rank partition gives it, its rows bit for bit the saved ones
    at_load, at_save = _union(results, "rows_at_load"), _union(whole, "rows_at_save")
    assert sorted(at_load) == sorted(at_save)
    for res in results:
        assert all(rank_of(sid, 2) == res["rank"] for sid in res["rows_at_load"])
    moved = [sid for sid in at_save if rank_of(sid, 2) != rank_of(sid, 3)]
    assert moved, "the re-partition must move streams between ranks"
    _assert_same(at_load, at_save, exact=True)
    # the two ranks stay identical; against the uninterrupted 3 ranks, the gradients' sums round
    # differently with 2 ranks than with 3, so weights, rows and errors agree to rounding
    assert results[0]["fingerprint"] == results[1]["fingerprint"]
    _assert_same(results[1]["shared"], results[0]["shared"], exact=True)
    _close(results[0], whole[0])
    _assert_same(_union(results, "rows"), _union(whole, "rows"), exact=False)
    errors = {sid: e for res in whole for sid, e in res["errors"].items()}
    for res in results:
        _same_errors(res["errors"], errors, exact=False)
    # the 2 ranks' own checkpoints: after the load (every stream changed since), then after one more
    # tick (incremental: only that tick's streams are written, the others named from before)
    ck = tmp_path / "ck"
    assert results[0]["saved"]["streams"] == len(at_save)
    assert sum(res["saved"]["streams_written"] for res in results) == len(_touched_late())
    first_tick = {sid for sid, _, _ in _ckpt_ranks.plan()[0]}
    assert sum(res["saved_again"]["streams_written"] for res in results) == len(first_tick) < len(at_save)
    back = read_state(ck)
    assert back["manifest"]["ranks"] == 2 and back["manifest"]["generation"] == 3
    _assert_same(back["state"]["streams"], _union(results, "rows_after"), exact=True)
    named = {name for _, name in back["manifest"]["streams"]}
    assert {f.name for f in (ck / STREAMS).iterdir()} == named  # the crashed write's files are gone
    assert sorted(f.name for f in ck.iterdir()) == sorted([MANIFEST, STREAMS, back["manifest"]["core"]])


def _one_learner_from(ck: Path) -> tuple[Any, dict[str, Any]]:
    one = _ranks.new_learner("rfp")
    extra = load_checkpoint(ck, one)
    return one, extra


@pytest.mark.slow
def test_one_learner_loads_the_group_checkpoint(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    out, whole = saved
    one, extra = _one_learner_from(out / "ck")
    assert extra == {"ranks": [{"rank": r, "half": True} for r in range(3)]}
    _assert_same(
        {sid: one.states.row(sid) for sid in one.stream_ids()}, _union(whole, "rows_at_save"), exact=True
    )
    _assert_same(shared_state(one), whole[0]["shared_at_save"], exact=True)
    # one learner sees every rank's rows in rank order (_ranks.play): the same update up to rounding
    _ranks.play(one, _ckpt_ranks.plan()[_ckpt_ranks.HALF :], None, 3)
    _close({"shared": shared_state(one), "covariances": _ckpt_ranks.covariances(one)}, whole[0])


@pytest.mark.slow
def test_two_ranks_load_one_learners_checkpoint(
    saved: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    out, whole = saved
    one, _ = _one_learner_from(out / "ck")
    save_checkpoint(tmp_path / "ck", one, {"one": True})  # a single worker's checkpoint: no "ranks"
    assert "ranks" not in read_state(tmp_path / "ck")["manifest"]
    results = _spawn(tmp_path, 2, "restore")
    for res in results:
        assert res["extras"] == [{"one": True}]
        assert all(rank_of(sid, 2) == res["rank"] for sid in res["rows_at_load"])
    _assert_same(_union(results, "rows_at_load"), _union(whole, "rows_at_save"), exact=True)
    _close(results[0], whole[0])


@pytest.mark.slow
def test_bptt_windows_follow_their_streams(tmp_path: Path) -> None:
    """BPTTLearner keeps each stream's window in the core: rank 0 writes every rank's, and each rank
    restores those of its streams."""
    whole = _spawn(tmp_path, 3, "save", "bptt")
    windows = read_state(tmp_path / "ck")["state"]["windows"]
    assert sorted(windows) == sorted(_union(whole, "rows_at_save"))
    assert all(w["inputs"] for w in windows.values())  # mid-window at the checkpoint: something to lose
    results = _spawn(tmp_path, 2, "restore", "bptt")
    _assert_same(_union(results, "rows_at_load"), _union(whole, "rows_at_save"), exact=True)
    _close(results[0], whole[0])
    _assert_same(_union(results, "rows"), _union(whole, "rows"), exact=False)


@pytest.mark.slow
def test_ranks_with_different_models_commit_nothing(tmp_path: Path) -> None:
    """Rank 0 writes the shared state for all: it commits only if every rank's fingerprint is its own."""
    results = _spawn(tmp_path, 2, "differ")
    for res in results:
        assert "ranks [1] hold another model than rank 0" in res["refused"]
    assert not (tmp_path / "ck" / MANIFEST).exists()


@pytest.mark.slow
def test_a_rank_that_cannot_read_the_folder_fails_the_checkpoint_on_every_rank(tmp_path: Path) -> None:
    """A local failure before the checkpoint's first collective (the generation, read from the folder)
    is told to every rank, which all go on: not a rank that leaves the others waiting in a collective."""
    results = _spawn(tmp_path, 2, "unreadable")
    for res in results:
        assert "rank 1: [Errno 116] Stale file handle" in res["refused"]
        assert res["saved"]["generation"] == 1  # nothing was committed before; the next one is
    assert read_state(tmp_path / "ck")["manifest"]["ranks"] == 2


@pytest.fixture
def group_of_one(tmp_path: Path) -> Any:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_failed_rank_write_commits_nothing(group_of_one: None, tmp_path: Path) -> None:
    """In process: a rank whose files cannot be written fails the checkpoint on every rank, the
    previous one stays; the next checkpoint writes every stream again."""
    learner = _ranks.new_learner("rfp")
    join(learner)
    plan = _ckpt_ranks.plan()
    _ranks.play(learner, plan[:5], 0, 1)
    ck = tmp_path / "ck"
    first = dist_checkpoint.save(ck, learner, {"n": 1})
    _ranks.play(learner, plan[5:10], 0, 1)

    def full_disk(stage: str) -> None:
        if stage == "rows":
            raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match=r"rank 0: .*No space left on device"):
        dist_checkpoint.save(ck, learner, {"n": 2}, full_disk)
    assert read_state(ck)["manifest"]["generation"] == first["generation"] == 1
    again = dist_checkpoint.save(ck, learner, {"n": 3})
    assert again["streams_written"] == again["streams"] == len(learner.stream_ids())
    assert read_state(ck)["extra"] == {"ranks": [{"n": 3}]}


def test_a_partition_that_loses_streams_is_refused(group_of_one: None, tmp_path: Path) -> None:
    """In process: a partition that gives some streams to no rank of the group (here, to a rank 1 that
    a group of one lacks) is refused before anything is loaded."""
    learner, fresh = _ranks.new_learner("rfp"), _ranks.new_learner("rfp")
    join(learner)
    _ranks.play(learner, _ckpt_ranks.plan()[:3], 0, 1)
    dist_checkpoint.save(tmp_path / "ck", learner)
    join(fresh)
    lost = [sid for sid in learner.stream_ids() if sid.endswith("1")]
    assert lost and len(lost) < len(learner.stream_ids())
    with pytest.raises(DistributedError, match=f"gives {len(learner.stream_ids()) - len(lost)} stream loads"):
        dist_checkpoint.load(tmp_path / "ck", fresh, lambda sid, ranks: int(sid in lost))
    assert fresh.stream_ids() == []
    assert dist_checkpoint.load(tmp_path / "ck", fresh, lambda sid, ranks: 0) == [{}]
    assert sorted(fresh.stream_ids()) == sorted(learner.stream_ids())


def test_a_group_checkpoint_needs_a_group(tmp_path: Path) -> None:
    learner = _ranks.new_learner("rfp")
    with pytest.raises(ConfigError, match="join"):
        dist_checkpoint.save(tmp_path / "ck", learner)
