"""Checkpoints of a distributed learner: every rank writes its streams, one manifest commits them all.

The ranks of a data-parallel group (``learner/distributed.py``) hold one model and disjoint streams.
A checkpoint of the group is an ordinary checkpoint folder (``learner/checkpoint.py``, version 4) on
a file system every rank sees (one machine's disk, or a shared one such as NFS for several
machines)::

    manifest.json               written last, by rank 0: names the core and every rank's streams
    core-<gen>.pt               the shared state (weights, optimizer, whitenings, counters), by rank 0
    streams/<id hash>-<gen>.pt  one stream's rows, by the rank that holds the stream

So one worker loads a group's checkpoint with ``load_checkpoint``, and a group loads one worker's.
The manifest adds ``"ranks"``, how many ranks wrote it, and the core's ``extra`` is
``{"ranks": [extra of rank 0, extra of rank 1, ...]}`` (each rank's bookkeeping, which ``load``
hands back to every rank: after a re-partition a stream's record may come from any writer).

**Saving** (``save``, or ``take`` in the tick loop then ``write``), collective:

1. the ranks agree on the generation (the greatest any rank would take), and each snapshots its
   learner (``take_snapshot``: the streams changed since its last commit there);
2. rank 0 gathers each rank's stream list, ``extra``, and ``fingerprint`` of the shared state: the
   core it writes is every rank's only if all the fingerprints are its own;
3. every rank writes its stream files (rank 0 the core too) and fsyncs them;
4. rank 0 gathers every rank's outcome; only when every rank's files are durable does it write the
   manifest (temporary file, fsync, rename, fsync of the folder), then delete what no manifest names;
5. rank 0 broadcasts the outcome: every rank commits (its next checkpoint writes only its changed
   streams) or raises ``CheckpointError``.

A crash or an error anywhere before the rename of step 4 leaves the previous manifest, and every file
it names, as the checkpoint: a new generation's files never replace a committed one's. A rank that
dies mid-way makes the others raise ``RankLost`` (as in a tick), not hang.

**Loading** (``load``), collective: every rank reads the same manifest, restores the shared part and
exactly the streams that ``partition(stream, ranks)`` gives it (``service.shards.rank_of``: the
learner does not import the service, so the caller passes the rule), whatever the number of ranks
that wrote the checkpoint (one worker included). The ranks then check that together they loaded
every stream once, and that their shared state is identical.

Examples
--------
A group of one saves, and loads into a fresh learner::

    >>> import tempfile, torch, torch.distributed as dist
    >>> from learner.config import ModelConfig
    >>> from learner.distributed import join
    >>> from learner.rfp import RFPLearner
    >>> dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(), 1), rank=0, world_size=1)
    >>> cfg = ModelConfig(trunk="none", in_features=8, n_units=6, embed_dim=4, pred_hidden=5)
    >>> learner, fresh = RFPLearner(cfg), RFPLearner(cfg)
    >>> sync = join(learner)
    >>> out = learner.tick_features(["a", "b"], torch.randn(2, 8))
    >>> folder = tempfile.mkdtemp()
    >>> save(folder, learner, {"n": 1})["streams"]
    2
    >>> sync = join(fresh)
    >>> load(folder, fresh, lambda stream, ranks: 0)
    [{'n': 1}]
    >>> fresh.stream_ids()
    ['a', 'b']
    >>> dist.destroy_process_group()
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from learner.checkpoint import load_checkpoint, read_checkpoint
from learner.checkpoint_format import Committed, stamp
from learner.checkpoint_write import (
    Snapshot,
    commit_manifest,
    next_generation,
    remove_unnamed,
    take_snapshot,
    write_files,
)
from learner.distributed import fingerprint
from learner.errors import CheckpointError, ConfigError, DistributedError, RankLost
from learner.streaming import StreamLearner

log = logging.getLogger(__name__)

_KEY_MOD = 1 << 40
Partition = Callable[[str, int], int]  # (stream id, ranks) -> the rank that holds the stream


@dataclass
class GroupSnapshot:
    """One rank's part of a group checkpoint taken (``take``) and not yet written (``write``)."""

    path: Path
    snap: Snapshot | None  # None: this rank could not take its snapshot (``problem`` says why)
    rank: int
    world: int
    group: dist.ProcessGroup | None
    files: dict[str, str]  # this rank's streams -> their files in the group's manifest
    problem: str | None  # why the checkpoint cannot be committed (rank 0: every rank's part), or None


def _device(group: dist.ProcessGroup | None, learner: StreamLearner) -> torch.device:
    """Where this module's small collective tensors live: the CPU on a gloo group (the service's
    checkpoint group is gloo even beside NCCL: service/dist_launch.py ``init_group``), else the
    learner's device (NCCL takes CUDA tensors only)."""
    return torch.device("cpu") if dist.get_backend(group) == "gloo" else learner.device


def _collective(group: dist.ProcessGroup | None, what: str, call: Callable[[], Any]) -> None:
    try:
        call()
    except RuntimeError as e:  # torch's DistBackendError and gloo's errors are RuntimeErrors
        raise RankLost(
            f"rank {dist.get_rank(group)} of {dist.get_world_size(group)}: {what} failed: another rank "
            f"exited, or stalled past the process group's timeout ({str(e).strip()[:300]})"
        ) from e


def _group_of(learner: StreamLearner) -> dist.ProcessGroup | None:
    if learner.sync is None:
        raise ConfigError("a group checkpoint is collective: join(learner) on every rank first")
    return learner.sync.group


def take(
    path: str | os.PathLike[str],
    learner: StreamLearner,
    extra: dict[str, Any] | None = None,
    *,
    group: dist.ProcessGroup | None = None,
) -> GroupSnapshot:
    """Steps 1 and 2 (collective, between ticks): agree on the generation, snapshot this rank's
    streams and state, and hand rank 0 every rank's part.

    ``group`` carries the checkpoint's collectives (default: the learner's); ``write`` uses it too,
    so a rank that writes in another thread than its tick loop's passes a group of its own
    (``dist.new_group``), whose collectives cannot interleave with the ticks'.
    """
    path = Path(path)
    group = _group_of(learner) if group is None else group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    snap, problem, generation = None, None, 0
    try:  # a local failure here must not keep this rank out of the collectives below (a hang)
        path.mkdir(parents=True, exist_ok=True)
        generation = next_generation(path, learner)
    except (OSError, CheckpointError) as e:  # a folder this rank cannot read: told to every rank below
        problem = f"rank {rank}: {e}"
    gen = torch.tensor([generation], dtype=torch.long, device=_device(group, learner))
    _collective(group, "the checkpoint's generation", lambda: dist.all_reduce(gen, dist.ReduceOp.MAX, group))
    if problem is None:
        try:
            snap = take_snapshot(path, learner, extra, generation=int(gen))
        except (OSError, CheckpointError) as e:  # one still being written, say: told to every rank below
            problem = f"rank {rank}: {e}"
    part: dict[str, Any] = {"problem": problem}
    if snap is not None:
        part.update(
            streams=snap.manifest["streams"],
            extra=snap.core["extra"],
            windows=snap.core.get("windows", {}),  # BPTTLearner: each stream's window rides in the core
            fingerprint=fingerprint(learner),
        )
    parts: list[Any] = [None] * world if rank == 0 else []
    try:
        _collective(
            group,
            "the checkpoint's gather",
            lambda: dist.gather_object(part, parts if rank == 0 else None, group=group, group_dst=0),
        )
    except BaseException:
        if snap is not None:
            _abandon(snap)
        raise
    files = {} if snap is None else {sid: name for sid, name in snap.manifest["streams"]}
    if rank == 0:
        problem = _merge(snap, parts, world)
    return GroupSnapshot(path, snap, rank, world, group, files, problem)


def _merge(snap: Snapshot | None, parts: list[dict[str, Any]], world: int) -> str | None:
    """Rank 0: make its snapshot's manifest and core the group's; return why not, if not."""
    problems = [p["problem"] for p in parts if p["problem"] is not None]
    if snap is None or problems:
        return "; ".join(problems)
    ours = parts[0]["fingerprint"]
    differ = [r for r, p in enumerate(parts) if p["fingerprint"] != ours]
    if differ:
        return f"ranks {differ} hold another model than rank 0: their shared state cannot be rank 0's core"
    owners: dict[str, int] = {}
    streams: list[list[str]] = []
    for r, p in enumerate(parts):
        for sid, name in p["streams"]:
            if sid in owners:
                return f"stream {sid!r} is held by ranks {owners[sid]} and {r}: the partition differs"
            owners[sid] = r
            streams.append([sid, name])
    snap.manifest["streams"] = streams
    snap.manifest["ranks"] = world
    snap.core["extra"] = {"ranks": [p["extra"] for p in parts]}
    if "windows" in snap.core:
        snap.core["windows"] = {sid: w for p in parts for sid, w in p["windows"].items()}
    return None


def _abandon(snap: Snapshot) -> None:
    """The snapshot will not be written: release its rows; the next checkpoint writes every stream."""
    assert snap.learner is not None
    if snap.rows is not None:
        snap.rows.release()
    snap.learner.states.checkpoint_base = None
    snap.learner.states.writing = False


def write(part: GroupSnapshot, stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Steps 3 to 5 (collective, in the tick loop or in a writer thread with its own group): write
    this rank's files, and commit the group's checkpoint once every rank's are durable.

    ``stage`` is called with ``"rows"`` before this rank's first stream file and, on rank 0,
    ``"commit"`` before the manifest. Raises ``CheckpointError`` on every rank when any rank could
    not write its part (the previous checkpoint stays the committed one); returns sizes and timing.
    """
    start = time.perf_counter()
    snap, group, rank = part.snap, part.group, part.rank
    states = None if snap is None or snap.learner is None else snap.learner.states
    outcome: list[Any] = [None]
    written = 0
    try:
        error = None
        if snap is not None and part.problem is None:
            try:
                written = write_files(snap, stage, core=rank == 0)
            except (OSError, RuntimeError, CheckpointError) as e:  # a full disk, a failed stage: told to all
                error = f"rank {rank}: {e}"
        elif snap is not None and snap.rows is not None:
            snap.rows.release()  # the parts cannot be committed (rank 0 said why): nothing to write
        errors: list[Any] = [None] * part.world if rank == 0 else []
        _collective(
            group,
            "the checkpoint's files check",
            lambda: dist.gather_object(error, errors if rank == 0 else None, group=group, group_dst=0),
        )
        if rank == 0:
            outcome[0] = _commit(snap, part.problem, [e for e in errors if e is not None], stage)
        _collective(
            group,
            "the checkpoint's commit",
            lambda: dist.broadcast_object_list(outcome, group=group, group_src=0),
        )
        result = outcome[0]
        if "error" in result:
            raise CheckpointError(f"the group's checkpoint at {part.path} failed: {result['error']}")
        assert snap is not None and states is not None
        states.checkpoint_base = Committed(
            part.path.resolve(), result["generation"], part.files, stamp(part.path)
        )
    except BaseException:
        if states is not None:
            states.checkpoint_base = None  # the changed streams were forgotten: the next write has them all
        raise
    finally:
        if states is not None:
            states.writing = False
    seconds = time.perf_counter() - start
    log.info(
        "group checkpoint %d written by rank %d of %d: %s (%d of %d streams written here, %.1f MB, %.2f s)",
        result["generation"], rank, part.world, part.path, len(snap.names), result["streams"],
        written / 2**20, seconds,
    )  # fmt: skip
    return {**result, "streams_written": len(snap.names), "bytes_written": written, "write_seconds": seconds}


def _commit(
    snap: Snapshot | None, problem: str | None, errors: list[str], stage: Callable[[str], None] | None
) -> dict[str, Any]:
    """Rank 0: the manifest, if every rank's part is written and consistent; else why not."""
    if snap is None or problem is not None or errors:
        return {"error": "; ".join([*([problem] if problem else []), *errors])}
    try:
        if stage is not None:
            stage("commit")
        commit_manifest(snap.path, snap.manifest)
        total = remove_unnamed(snap.path, snap.manifest)
    except (OSError, RuntimeError, CheckpointError) as e:
        return {"error": f"rank 0, the manifest: {e}"}
    return {
        "generation": snap.manifest["generation"],
        "streams": len(snap.manifest["streams"]),
        "bytes": total,
    }


def save(
    path: str | os.PathLike[str],
    learner: StreamLearner,
    extra: dict[str, Any] | None = None,
    stage: Callable[[str], None] | None = None,
    group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """Checkpoint the group now (collective, between ticks): ``take`` then ``write``. ``group``:
    as for ``take`` (a group with a longer timeout than the ticks', for a write that may be long)."""
    return write(take(path, learner, extra, group=group), stage)


def load(
    path: str | os.PathLike[str],
    learner: StreamLearner,
    partition: Partition,
    group: dist.ProcessGroup | None = None,
) -> list[dict[str, Any]]:
    """Restore this rank from ``path`` (collective, after ``join``): the shared state and the streams
    ``partition(stream, ranks)`` gives this rank; return every writer rank's ``extra`` (rank order;
    one for a single worker's checkpoint). ``group`` carries the load's collectives (default: the
    learner's); one with a longer timeout than the ticks' lets ranks wait for a slow load.

    Raises ``CheckpointError`` when the ranks read different manifests (the folder must be one that
    every rank sees), ``DistributedError`` when the partition loses or duplicates a stream, or the
    ranks end with different shared state.
    """
    path = Path(path)
    group = _group_of(learner) if group is None else group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    manifest = read_checkpoint(path)
    ids = [sid for sid, _ in manifest["streams"]]
    mine = {sid for sid in ids if partition(sid, world) == rank}
    # summed over the ranks: [generation, streams listed] must be world times one rank's, [streams
    # loaded, their keys' sum] the manifest's
    check = torch.tensor(
        [manifest["generation"], len(ids), len(mine), _key_sum(mine)],
        dtype=torch.long,
        device=_device(group, learner),
    )
    _collective(group, "the checkpoint's load check", lambda: dist.all_reduce(check, group=group))
    generations, listed, loaded, keys = check.tolist()
    if generations != world * manifest["generation"] or listed != world * len(ids):
        raise CheckpointError(
            f"the ranks read different checkpoints at {path}: it must be the same folder on every rank "
            "(one machine's disk, or a file system they share)"
        )
    if loaded != len(ids) or keys % _KEY_MOD != _key_sum(set(ids)):
        raise DistributedError(
            f"the partition gives {loaded} stream loads for the {len(ids)} streams of {path}: every rank "
            "must pass the same partition function (service.shards.rank_of)"
        )
    extra = load_checkpoint(path, learner, keep=mine.__contains__, manifest=manifest)
    # every rank done loading (on ``group``'s timeout) before the check on the learner's
    _collective(group, "the checkpoint's load", lambda: dist.barrier(group=group))
    assert learner.sync is not None
    learner.sync.check_identical()
    return list(extra["ranks"]) if "ranks" in manifest else [extra]


def _key_sum(ids: set[str]) -> int:
    """The streams' 64-bit keys summed modulo 2^40 (with the counts, it catches a lost or duplicated
    stream; the ranks' sums add up in an int64 for up to 2^23 ranks)."""
    keys = (int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big") for s in ids)
    return sum(keys) % _KEY_MOD
