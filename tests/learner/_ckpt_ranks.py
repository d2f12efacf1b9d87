"""What each spawned rank of tests/learner/test_dist_checkpoint.py runs (importable: spawn pickles by name).

Every rank plays the tick schedule of ``tests/learner/_ranks.py`` (the one of 3 ranks, whatever the
group's size: a run that changes its number of ranks half-way plays one schedule), its streams
picked by ``rank_of`` for the group's size; the learner is ``kind`` (``_ranks.new_learner``). Roles:

``save``
    play the first half, checkpoint the group to ``ck``, play the second half (the uninterrupted
    run), then start a second checkpoint in which rank 0 dies between the ranks' files and the
    manifest (its ``commit`` stage): the other ranks must see ``RankLost``, and ``ck`` must still
    hold the first checkpoint. The second checkpoint runs on a group of its own (as a writer thread
    would).
``restore``
    restore from ``ck`` (written by any number of ranks, or by one learner), play the second half,
    then checkpoint the group again into the same folder; play the schedule's first tick once more
    and checkpoint again (an incremental one: only the streams of that tick are written).
``differ``
    play 3 ticks; the last rank's weights then drift (as by a bug); a checkpoint must be refused.

Each rank leaves its streams' rows, its shared state, its per-stream errors and any error in
``out/<role><world>-rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from learner import dist_checkpoint
from learner.distributed import fingerprint, join, shared_state
from learner.errors import CheckpointError, RankLost
from learner.snapshot import cloned
from learner.streaming import StreamLearner
from learner.whitening import RunningWhitening
from service.shards import rank_of
from tests.learner import _ranks

TICKS = 40
HALF = TICKS // 2
PLAN_WORLD = 3  # the schedule's idle ticks are laid out for 3 ranks


def plan() -> list[_ranks.Tick]:
    return _ranks.schedule(TICKS, PLAN_WORLD)


def rows(learner: StreamLearner) -> dict[str, dict[str, torch.Tensor]]:
    """Every stream this learner holds: its rows (copies)."""
    return {sid: learner.states.row(sid) for sid in learner.stream_ids()}


def covariances(learner: StreamLearner) -> dict[str, torch.Tensor]:
    """Each running whitening's whole covariance, its pending rows folded in: what a run that observed
    the same rows in another order holds too, up to rounding (the pending rows themselves differ)."""
    return {
        name: m.covariance() for name, m in learner.model.named_modules() if isinstance(m, RunningWhitening)
    }


def result_file(out: str, role: str, world: int, rank: int) -> Path:
    return Path(out) / f"{role}{world}-rank{rank}.pt"


def rank_main(rank: int, world: int, port: int, out: str, role: str, kind: str = "rfp") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result: dict[str, Any] = {"rank": rank}
    where = result_file(out, role, world, rank)
    ck = Path(out) / "ck"
    try:
        # a long rendezvous and collective timeout: spawned interpreters start at different times on
        # a loaded machine; a lost rank is seen at once anyway (its sockets close)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
        writer_group = dist.new_group()
        learner = _ranks.new_learner(kind)
        join(learner)
        ticks = plan()
        if role == "save":
            _ranks.play(learner, ticks[:HALF], rank, world)
            result["saved"] = dist_checkpoint.save(ck, learner, {"rank": rank, "half": True})
            result["rows_at_save"] = rows(learner)
            result["shared_at_save"] = cloned(shared_state(learner))  # the live tensors change
            result["errors"] = _ranks.play(learner, ticks[HALF:], rank, world)

            def die_before_the_manifest(stage: str) -> None:
                if stage == "commit" and rank == 0:
                    torch.save(result, where)
                    os._exit(0)  # as a crash: nothing after this line runs, no clean-up

            result["rows"], result["shared"] = rows(learner), cloned(shared_state(learner))
            result["covariances"] = covariances(learner)
            try:
                part = dist_checkpoint.take(ck, learner, {"rank": rank}, group=writer_group)
                dist_checkpoint.write(part, die_before_the_manifest)
            except RankLost as e:
                result["lost"] = str(e)
        elif role == "differ":
            _ranks.play(learner, ticks[:3], rank, world)
            if rank == world - 1:
                with torch.no_grad():
                    learner.model.rgc.W[0, 0] += 1e-9  # as a bug that let one rank's weights drift
            try:
                dist_checkpoint.save(ck, learner)
            except CheckpointError as e:
                result["refused"] = str(e)
        elif role == "unreadable":  # the last rank cannot read the folder (a stale NFS handle, say)
            _ranks.play(learner, ticks[:3], rank, world)
            real = dist_checkpoint.next_generation
            if rank == world - 1:

                def stale(path: Any, learner: Any) -> int:
                    raise OSError(116, "Stale file handle")

                dist_checkpoint.next_generation = stale  # type: ignore[assignment]
            try:
                dist_checkpoint.save(ck, learner)
            except CheckpointError as e:
                result["refused"] = str(e)
            dist_checkpoint.next_generation = real  # type: ignore[assignment]
            result["saved"] = dist_checkpoint.save(ck, learner)  # the next one commits
        else:
            result["extras"] = dist_checkpoint.load(ck, learner, rank_of)
            result["rows_at_load"] = rows(learner)
            result["errors"] = _ranks.play(learner, ticks[HALF:], rank, world)
            result["rows"], result["shared"] = rows(learner), cloned(shared_state(learner))
            result["covariances"] = covariances(learner)
            result["saved"] = dist_checkpoint.save(ck, learner, {"rank": rank})
            _ranks.play(learner, ticks[:1], rank, world)  # one more tick: some streams change
            result["saved_again"] = dist_checkpoint.save(ck, learner, {"rank": rank})
            result["rows_after"] = rows(learner)
        result["fingerprint"] = fingerprint(learner)
    except Exception:
        result["traceback"] = traceback.format_exc()
        raise
    finally:
        torch.save(result, where)
    # Leave without tearing gloo down (see tests/learner/_ranks.py: its destructors can abort the
    # process when a peer has closed its sockets); the result is on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
