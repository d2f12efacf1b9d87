"""The checkpoints of a distributed worker (service/dist_worker.py): when the ranks take one together,
what each rank saves, and how a group of any size restores it.

**Taking.** A group checkpoint is collective (learner/dist_checkpoint.py ``take`` then ``write``):
every rank must snapshot it between the same two ticks. So no rank starts one on its own: a periodic
checkpoint due on a rank or a ``checkpoint`` command (rank 0) only *want* one
(:attr:`DistCheckpointDriver.want`); the iteration's agreement (the third flag) tells every rank.
Then, as the single worker does (service/checkpointer.py), each rank snapshots its part in the loop,
after the tick, under the tick lock (``take``: the generation agreed, rank 0's core, its streams
copy-on-write, its service state; rank 0 gathers every rank's part and fingerprint), and its
:class:`~service.checkpointer.Checkpointer` thread writes the files and runs the collective commit
(``write``: fsync, every rank's outcome to rank 0, the manifest) on the checkpoint process group,
while the loop ticks on, on the learner's group. ``foveate_checkpoint_stall_seconds`` is the
snapshot only; ``foveate_checkpoint_seconds`` the write.

One write is in flight at a time, on every rank alike: the agreement's fourth flag says that some
rank's write has not ended yet (:attr:`DistCheckpointDriver.writing`, until the loop has *settled*
it), and a checkpoint agreed then waits for a later agreement (the wish stays). So no rank snapshots,
and no two threads use the checkpoint group, while any rank still writes. The loop settles an ended
write at each iteration: it answers the commands that waited (after the commit, or with the error
when any rank's part failed: then nothing was committed, on any rank), trims the command journal up
to the snapshot's position (in the writer, after the commit), and re-raises a lost rank
(``RankLost``: the rank exits with status 3; a peer that died is reported by gloo at once, and a
stalled one makes the loop's own next collective time out, so a write in flight never hangs the
group). (A reset or delete over Redis is answered at once, from the rank's command journal.) A stop
agreed by the ranks (SIGTERM to any) waits for the write in flight, then takes the final checkpoint
and waits for its commit before the ranks exit; so does the checkpoint at start.

**What each rank saves** as its ``extra``: ``Worker.service_state`` (its streams' records: seq,
dedup answers; its shard's input offset; its deleted streams). ``load`` hands every writer's back.

**Restoring** (:meth:`DistCheckpointDriver.restore`): rank 0 decides whether there is a checkpoint,
and which number of ranks wrote it, and tells the others (a rank that saw the folder otherwise
would enter other collectives); then every rank loads the shared state and the streams
``rank_of(stream, world)`` gives it, and takes each of its streams' record from whichever writer
held the stream. Then:

- *same number of ranks* (a group checkpoint of ``world`` ranks): rank ``r`` resumes its shard after
  writer ``r``'s input offset, as the single worker does (every fixation applied exactly once), and
  re-applies the resets and deletes of its shard's command journal after writer ``r``'s journal
  position at their place (service/journal.py); a commit trims the journal;
- *another number* (or a single worker's checkpoint): the streams move to their new ranks, and the
  old shards' entries after each writer's saved offset (fixations the old ranks learned after the
  checkpoint and lost, or never read) are handed over to the streams' new ranks and applied before
  anything else, each exactly once (service/handover.py: where each old shard ends is agreed, each
  stream's fixations keep their order, the old consumer groups move past them). A stream that
  changed keys forgets its last entry ids, the tombstones of deleted streams (entry ids of the old
  shards) are dropped after the hand-over, and so are the journals' records: the checkpoint holds
  their effect, since a re-partition is **refused**, naming the key, when an old rank's command
  journal holds resets or deletes after its writer's saved position (their place is an entry id of
  the old shard, which the new layout does not read in that order: restart with the old number of
  ranks first). The group checkpoints the new layout in ``DistWorker.start``, before it answers
  anything new, so that a crash after it restores the new layout and one before it hands the same
  fixations over again.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from learner.errors import CheckpointError, ConfigError, DistributedError, FoveateError
from service import metrics
from service.checkpointer import CheckpointDriver, WriteJob, committed
from service.handover import Handover, OldShard, old_ends
from service.redis_common import id_text
from service.replies import failure
from service.shards import rank_of, shard_key

if TYPE_CHECKING:
    import threading

    from service.dist_worker import DistWorker

logger = logging.getLogger(__name__)


class DistCheckpointDriver(CheckpointDriver):
    """``CheckpointDriver``'s interface for one rank of a group (see the module docstring): its
    collective snapshot is taken only where the loop calls it, on every rank at once, and written by
    the inherited ``writer`` thread."""

    def __init__(self, worker: DistWorker, lock: threading.Lock) -> None:
        super().__init__(worker, lock)
        self.dist_worker = worker
        self.wanted = False  # a periodic checkpoint is due here: asked for at the next agreement
        self.repartitioned = False  # restored another layout: checkpoint the new one at start

    # ------------------------------------------------------------------ restore

    def restore(self) -> bool:
        """Load the group's (or a single worker's) checkpoint, if any, into this rank (collective)."""
        from learner.checkpoint import has_checkpoint, read_checkpoint
        from learner.dist_checkpoint import load

        worker = self.dist_worker
        path = worker.settings.checkpoint_path
        if path is None:  # the same settings on every rank: none of them restores
            logger.info("rank %d: checkpoints are disabled: starting fresh", worker.rank)
            return False
        # rank 0 decides whether there is a checkpoint, and who wrote it, for every rank: a rank
        # that saw the shared folder otherwise (not mounted yet, a commit racing the look) would
        # enter other collectives than the rest (a load, a hand-over) and hang the group
        found: list[Any] = [None]
        if worker.rank == 0:
            exists, writers, error = has_checkpoint(path), None, None
            try:
                writers = read_checkpoint(path).get("ranks") if exists else None
            except CheckpointError as exc:  # told to every rank: all of them refuse it
                error = str(exc)
            found = [(exists, writers, error)]
        assert worker.sync is not None
        worker.sync._collective(
            "whether there is a checkpoint to restore",
            lambda: dist.broadcast_object_list(found, group=self._group(), group_src=0),
        )
        exists, writers, error = found[0]  # writers None: one worker's checkpoint
        if error is not None:
            raise CheckpointError(error)
        if not exists:
            logger.info("rank %d: no checkpoint at %s: starting fresh", worker.rank, path)
            return False
        extras = load(path, worker.learner, rank_of, group=worker.checkpoint_group)
        services = [extra.get("service", {}) for extra in extras]
        records: dict[str, Any] = {}
        for service in services:  # each stream's record from the writer that held it
            records.update(service.get("records", {}))
        if writers == worker.world:
            mine = services[worker.rank]
            saved = {**mine, "records": records}
            worker.load_service_state(saved)  # keeps the records of the streams this rank loaded
        else:
            handover = self._handover(services, writers)
            # tombstones and records as the old layout left them: the hand-over's screening needs
            # them (their entry ids are those of the old shards it reads); the journals' records are
            # all in the checkpoint (``_handover`` refused otherwise): skip them, and older ones that
            # a shard's journal may keep from an earlier layout
            deleted: dict[str, Any] = {}
            for service in services:
                deleted.update(service.get("deleted", {}))
            journal: dict[str, Any] = {"through": worker.broker.journal_last(), "pending": []}
            saved = {"records": records, "input_offset": handover.resume_after(), "deleted": deleted,
                     "journal": journal, "checkpoint": services[0].get("checkpoint")}  # fmt: skip
            worker.load_service_state(saved)
            worker.hand_over(handover)
            self.repartitioned = True  # the new layout is checkpointed once the group has started
        logger.info("rank %d of %d restored %s (written by %s): %d streams, resuming after %s",
                    worker.rank, worker.world, path, f"{writers} ranks" if writers else "one worker",
                    len(worker.records), saved.get("input_offset"))  # fmt: skip
        return True

    def _handover(self, services: list[dict[str, Any]], writers: int | None) -> Handover:
        """Refuse what cannot be handed over (an old journal's records after its writer's saved
        position); agree with the other ranks where every old shard ends; read this rank's part."""
        worker = self.dist_worker
        base = worker.input_base
        journal_base = worker.settings.journal_stream.rsplit(":", 1)[0]
        keys = [shard_key(base, r) for r in range(writers)] if writers else [base]
        journals = [shard_key(journal_base, r) for r in range(writers)] if writers else [journal_base]
        sync = getattr(worker.broker, "sync", None)  # a Redis broker (others keep no entries)
        for key, service in zip(journals, services, strict=True):
            saved = service.get("journal", {})
            through = saved.get("through")
            low = "(" + through if through else "-"
            left: Any = [] if sync is None else sync.xrange(key, min=low, max="+", count=1)
            if left or saved.get("pending"):
                first = id_text(left[0][0]) if left else saved["pending"][0].get("journal_id")
                raise CheckpointError(
                    f"the checkpoint at {worker.settings.checkpoint_path} was written by "
                    f"{writers or 'one'} worker(s) and this group has {worker.world} ranks, but the "
                    f"command journal {key} holds resets or deletes after the checkpoint (first: "
                    f"{first!r}) whose place is among the old shard's entries: restart "
                    + (f"with WORLD_SIZE={writers}" if writers else "the single worker (`foveate worker`)")
                    + " to apply them (then stop it with SIGTERM while no fixations arrive) before "
                    "changing the ranks"
                )
        # every rank hands over the same ranges: rank 0 reads where the old shards end now
        ends: list[Any] = [None if sync is None else old_ends(sync, keys)] if worker.rank == 0 else [None]
        assert worker.sync is not None
        worker.sync._collective(
            "the re-partition's hand-over ranges",
            lambda: dist.broadcast_object_list(ends, group=self._group(), group_src=0),
        )
        agreed = ends[0] or [None] * len(keys)
        offsets = [service.get("input_offset") for service in services]
        shards = [
            OldShard(r, key, offset, end, shared=bool(writers) and r < worker.world)
            for r, (key, offset, end) in enumerate(zip(keys, offsets, agreed, strict=True))
        ]
        handover = Handover(shards, writers or 1, worker.world, worker.rank)
        if sync is not None:
            handover.read(sync, worker.decoder())
        return handover

    def _group(self) -> dist.ProcessGroup | None:
        """The checkpoints' group (its long timeout: a rank may be reading files while the others
        wait), the learner's where none was given (a group of one)."""
        return self.dist_worker.checkpoint_group or self.dist_worker.group

    # ------------------------------------------------------------------ take

    @property
    def want(self) -> bool:
        """Whether this rank asks the group for a checkpoint at the next agreement."""
        return self.wanted or bool(self._waiting)

    @property
    def writing(self) -> bool:
        """Whether this rank's part of a checkpoint is still being written, or its end not yet settled
        (:meth:`settle`): told to the group at each agreement, so that no rank takes a snapshot
        while any rank's writer still uses the checkpoint group."""
        return self._committing is not None

    def begin(self) -> None:
        """The agreed checkpoint (every rank, after the same tick, no rank writing): take the snapshot
        here, in the loop, and write it beside the loop; a failure is logged (and told to the
        commands that waited), a lost rank (``DistributedError``) propagates."""
        try:
            self._begin(background=not self._waiting)
        except (FoveateError, OSError) as exc:
            logger.error("group checkpoint failed: %s", exc)

    def checkpoint(self, *, wait: bool = True) -> dict[str, Any] | None:
        """The group's checkpoint now, waited for (collective: every rank calls it between the same
        ticks, at start and at stop): after the write in flight, if any; answers the commands that
        waited. ``wait`` is ignored: the loop takes the others with :meth:`begin`."""
        self.writer.wait()
        self.settle()
        job = self._begin(background=False)
        self.writer.wait()
        self._answer()
        return job.result()  # raises what the write raised: a lost rank, or a failure on any rank

    def _begin(self, *, background: bool) -> WriteJob:
        """Snapshot this rank's part (under the lock: the only pause of learning), hand rank 0 every
        rank's (``take``, on the checkpoint group), and start writing it and committing the group's
        checkpoint in the writer's thread (``write``, on the same group): the loop ticks on meanwhile,
        on the learner's group."""
        worker = self.dist_worker
        path = worker.settings.checkpoint_path
        if path is None:
            raise ConfigError("checkpoints are disabled: set FOVEATE_CHECKPOINT_PATH")
        from learner.dist_checkpoint import take, write

        assert not self.writing, "the agreement lets no rank take a snapshot while one writes"
        waiting, self._waiting, self.wanted = self._waiting, [], False
        try:
            with self._lock:
                start, written_at = time.perf_counter(), time.time()
                info: dict[str, Any] = {"path": str(path), "written_at": written_at,
                                        "updates_applied": worker.learner.updates_applied,
                                        "streams": len(worker.records), "rank": worker.rank,
                                        "world_size": worker.world}  # fmt: skip
                service = worker.service_state(dict(info))
                part = take(path, worker.learner, {"service": service}, group=worker.checkpoint_group)
                info["stall_seconds"] = time.perf_counter() - start
        except DistributedError:
            raise  # a lost rank: the loop exits for a restart
        except (FoveateError, OSError) as exc:
            self.worker.broker.reply([(ctl, failure(exc)) for ctl in waiting])
            raise
        finally:
            self.last_taken = time.monotonic()
        metrics.CHECKPOINT_STALL_SECONDS.observe(info["stall_seconds"])
        through = service.get("journal", {}).get("through")  # the snapshot's journal position
        device = torch.cuda.current_device() if worker.learner.device.type == "cuda" else None

        def write_part() -> dict[str, Any]:  # in the writer's thread
            if device is not None:  # a thread's current CUDA device is its own: the loop's, for NCCL
                torch.cuda.set_device(device)
            return committed(worker, info, write(part, worker.checkpoint_stage), through)

        job = self.writer.submit(write_part, background=background)
        job.waited = True  # its end is reported by settle: to the commands, or in the log
        self._committing = (job, waiting)
        return job

    def quietly(self, when: str, *, wait: bool = True) -> None:
        """``wait`` (at start and at stop, on every rank): checkpoint now and wait for the commit,
        logging a failure. Otherwise (a periodic checkpoint due on this rank's clock): ask for one
        at the next agreement."""
        if self.worker.settings.checkpoint_path is None:
            return
        if not wait:
            self.wanted = True
            return
        try:
            self.checkpoint()
        except DistributedError:
            raise
        except (FoveateError, OSError) as exc:  # the same error on every rank (write tells them all)
            logger.error("group checkpoint %s failed: %s", when, exc)

    def settle(self) -> None:
        """Called from the loop: once the write in flight has ended, answer the commands that waited
        for it, log a failure, and raise a lost rank (``DistributedError``: the loop exits)."""
        if self._committing is None or not self._committing[0].done.is_set():
            return
        job = self._answer()
        if isinstance(job.error, DistributedError):
            raise job.error
        if job.error is not None:  # the same on every rank (write tells them all): nothing committed
            logger.error("group checkpoint failed: %s", job.error)

    def _answer(self) -> WriteJob:
        """Answer the commands that waited for the ended write in flight; return its job."""
        assert self._committing is not None
        job, waiting = self._committing
        self._committing = None
        self.worker.broker.reply([(ctl, self._committed(job)) for ctl in waiting])
        return job

    def drain(self) -> None:
        """At stop, the loop having ended: the write in flight is waited for and its commands
        answered; a command still waiting gets an error (the group is gone)."""
        self.writer.wait()
        if self._committing is not None:
            self._answer()
        if self._waiting:
            error = CheckpointError("the distributed worker stopped before a checkpoint committed")
            self.worker.broker.reply([(ctl, failure(error)) for ctl in self._waiting])
            self._waiting = []


__all__ = ["DistCheckpointDriver"]
