"""``foveate worker --distributed``: one rank of a group of workers that learn one model together.

Launched by torchrun, one process per rank (docs/deploy.md, "Scale-out on torch.distributed")::

    torchrun --nproc-per-node 2 -m foveate worker --distributed

Each rank reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` from its environment,
joins a process group (service/dist_launch.py; gloo on the CPU, NCCL when the learner is on CUDA),
makes its learner one rank of the data-parallel model (``learner.distributed.join``) and consumes
only its shard of Redis: the input, control and heartbeat keys of rank ``r`` are
``shard_key(key, r)`` (``foveate:fixations:1``), where the API (``FOVEATE_SHARDS`` = the world
size) writes the fixations and commands of every stream that ``rank_of(stream_id, world)`` gives to
``r``. Results go to the shared result keys.

**Lockstep.** Every learning tick is a collective (learner/distributed.py), so every rank must take
exactly one per iteration, or none. Each iteration of :meth:`DistWorker.run`:

1. gathers a tick's fixations as the single worker does, waiting at most ``_POLL_S`` when none come
   (so an idle service makes a few small agreements a second, not a spin);
2. agrees with the others in one ``all_reduce`` (max) of six flags: has any rank fixations, does
   any rank want to stop, does any want a checkpoint, is any still writing one (below), is any
   still draining, has any passed the drain's deadline;
3. if any rank has fixations, every rank ticks: on its own admitted fixations, or ``idle_tick``;
4. answers its commands (all local: a stream's state lives on its rank; ``model`` on rank 0), and
   snapshots a checkpoint when agreed.

**Stopping.** SIGTERM to one rank stops all: once the stop is agreed, the ranks drain (for at most
``DRAIN_S``: they go on ticking while any rank holds fixations or its shard has entries past its
input offset, asked of Redis at each check), then checkpoint together and return.

**A bad fixation** must not cost a tick on one rank only. The single worker's recovery (apply each
fixation alone when a tick fails: several learning ticks in one iteration) would break lockstep, so
a rank screens before the tick instead: it computes the trunk features locally (no collective) and,
when that fails, finds the bad fixation by encoding each alone, then ticks once on the good ones. A
tick that still fails before its first collective becomes this rank's ``idle_tick`` and its
fixations are answered with the error; one that fails inside the collectives leaves the ranks out of
step, and the rank exits non-zero.

**A lost rank.** A rank that dies or stalls makes the others' next collective fail within
``FOVEATE_DIST_TIMEOUT_S`` (gloo reports a closed peer at once): they log the ``RankLost`` and exit
with status 3, so that the orchestrator (torchrun, compose) restarts the group; never a hang.

**Checkpoints** (``FOVEATE_CHECKPOINT_PATH``; service/dist_checkpointer.py): every
``FOVEATE_CHECKPOINT_INTERVAL_S``, on a ``checkpoint`` command (rank 0), and when the ranks agree to
stop, the third flag makes every rank snapshot its part of one group checkpoint
(learner/dist_checkpoint.py) after the same tick, in the loop, unless the fourth says a write is
still in flight somewhere (then a later iteration takes it); a thread on each rank writes it and
commits it together beside the loop, on the checkpoint process group, and the command is answered
after the commit. The stop's checkpoint waits for the write in flight, then for its own commit. A
reset or delete over Redis is written to the rank's command journal and answered at once
(service/journal.py). At start every rank restores the checkpoint, with the same or another number
of ranks: with another number, the old shards' unanswered fixations are handed to the streams'
new ranks first (:meth:`DistWorker.hand_over`, service/handover.py) and the new layout is
checkpointed before anything new is answered. A stop drains for at most ``DRAIN_S`` (the sixth
flag: some rank's deadline passed). ``stop(checkpoint=True)`` takes no checkpoint of its own (one
rank, outside the loop: the others would never join it); the agreed stop's is the final one. With
more than one rank the checkpoints need a process group of their own (``checkpoint_group``).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from learner.distributed import TickSync, fingerprint, idle_tick, join
from learner.errors import ConfigError, DistributedError, FoveateError, InputError
from learner.patches import preprocess
from learner.streaming import StreamLearner, TickOutput
from service import metrics
from service.admission import Accepted
from service.batching import TickBatcher
from service.broker import Broker, Message
from service.config import Settings
from service.dist_checkpointer import DistCheckpointDriver
from service.errors import WorkerError
from service.handover import Handover
from service.learner_setup import spill_folder
from service.messages import Fixation
from service.replies import failure, reject_reason
from service.shards import rank_of, shard_key
from service.streams import InputOffset
from service.worker import Worker

logger = logging.getLogger(__name__)

#: How long an iteration waits for a first fixation before the ranks agree that nobody has one.
_POLL_S = 0.05
#: At most this long after an agreed stop, the ranks answer the fixations in hand and in their
#: shards before the final checkpoint (so that a re-partition has little to hand over). torchrun
#: gives its ranks 30 s after passing SIGTERM on, then kills them: the drain, the write in flight
#: and the final checkpoint's must fit in that.
DRAIN_S = 10.0


def _never() -> bool:
    return False


class Agreement(NamedTuple):
    """What every rank decided together at the start of an iteration."""

    rows: bool  # some rank has fixations: every rank takes one learning tick
    stop: bool  # some rank was asked to stop: all stop after this iteration
    checkpoint: bool  # some rank wants a checkpoint: all snapshot one after this iteration's tick
    writing: bool  # some rank's checkpoint write is in flight: the snapshot waits for its end
    more: bool  # stopping, some rank still has fixations to answer: the drain goes on
    over: bool  # stopping, some rank's drain deadline passed: all stop after this iteration


class DistWorker(Worker):
    """A worker that is one rank of a data-parallel group (see the module docstring).

    Parameters
    ----------
    settings
        This rank's settings (:func:`service.dist_launch.rank_settings`).
    broker
        Its Redis broker (reading its shard).
    group
        The process group the learner's collectives use (:func:`service.dist_launch.init_group`).
    learner
        A ready learner; built from ``settings`` when ``None``.
    checkpoint_group
        The group the checkpoints' collectives use (a long timeout). Required with more than one
        rank: the writer's thread runs them beside the loop's, and two threads must not share a
        group. A group of one may leave it ``None`` (then ``group``).
    """

    checkpoints: DistCheckpointDriver  # the group's checkpoints (service/dist_checkpointer.py)

    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        group: dist.ProcessGroup | None = None,
        learner: StreamLearner | None = None,
        checkpoint_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.rank = dist.get_rank(group)  # before Worker's __init__: its spill folder is this rank's
        self.world = dist.get_world_size(group)
        if checkpoint_group is None and self.world > 1:
            raise ConfigError(
                f"a DistWorker of {self.world} ranks needs a checkpoint_group of its own (the second "
                "group of service.dist_launch.init_group): its checkpoint writer's collectives run "
                "beside the loop's, which must not share a process group with them"
            )
        super().__init__(settings, broker, learner)
        self.group = group
        self.checkpoint_group = checkpoint_group  # None: the checkpoints use ``group``
        self.input_base = settings.input_stream.rsplit(":", 1)[0]  # the key before rank_settings
        self.checkpoints = DistCheckpointDriver(self, self._lock)
        self.batcher = TickBatcher(settings.max_batch, settings.max_wait_ms / 1000.0, idle_poll_s=_POLL_S)
        self.sync: TickSync | None = None
        self._features: torch.Tensor | None = None  # (B, M) of the fixations being ticked
        self._ticks_before = 0  # the learning tick counter when the learner was called

    def spill_folder(self) -> Path | None:
        """``<checkpoint>.spill/rank-<r>``: the ranks of one machine share the checkpoint's folder, and
        each empties its spill folder at start (a rank restarting alone must not delete the state
        of another's spilled streams)."""
        return spill_folder(self.settings, self.rank)

    # ------------------------------------------------------------------ life cycle

    def start(self, *, thread: bool = False) -> None:
        """Join the group's model (collective: every rank checks it holds the same), then start
        reading this rank's shard. The loop runs on the caller's thread unless ``thread``."""
        self.sync = join(self.learner, self.group)
        super().start(thread=False)
        if self.checkpoints.repartitioned and self.settings.checkpoint_path is not None:
            # the new layout's offsets and the hand-over's effect, before anything new is answered
            # (and before the loop: collectives on one thread): a crash after it restores this
            # layout; a failure stops the rank, which could not resume this layout otherwise
            self.checkpoints.checkpoint()
            self.checkpoints.repartitioned = False
        if thread:
            self._thread = threading.Thread(target=self.run, name="foveate-worker", daemon=True)
            self._thread.start()

    def stop(self, *, checkpoint: bool = True) -> None:
        """Stop the loop and close the broker's worker side. A group checkpoint is collective: every
        rank takes it at the stop the ranks agree on, in the loop (``run``); a checkpoint asked for
        here, on one rank and outside the loop, would wait for ranks that never join it, so it is
        ignored, with a warning."""
        if checkpoint and self.settings.checkpoint_path is not None and self.started:
            logger.warning("rank %d: stop(checkpoint=True) takes no checkpoint of its own: a group "
                           "checkpoint is collective; the stop the ranks agree on (request_stop, "
                           "then run returns) takes the final one in the loop", self.rank)  # fmt: skip
        super().stop(checkpoint=False)

    def hand_over(self, handover: Handover) -> None:
        """Apply the fixations the old layout left unanswered (service/handover.py), in lockstep
        ticks with the other ranks, then move the old shards' consumer groups past them and forget
        the old shards' entry ids (collective, at restore)."""
        assert self.sync is not None
        # the ranks read and decode shares of different sizes: they wait for each other on the long
        # timeout (the checkpoints'), not the ticks'
        slow = self.checkpoint_group or self.group
        self.sync._collective("the hand-over's read", lambda: dist.barrier(group=slow))
        if handover.misrouted:
            self._refuse_misrouted(handover.misrouted)
        while True:
            batch = handover.batch(self.settings.max_batch)
            if not self._agree(rows=bool(batch), stop=False).rows:
                break
            for fix in batch:
                if (fix.stream_id, fix.entry_id) in handover.switches:  # its new-layout part begins
                    self.deleted.lift(fix.stream_id)
                    if (rec := self.records.get(fix.stream_id)) is not None:
                        rec.last_entry_id = None
            self._lockstep_tick(batch)
        sync = getattr(self.broker, "sync", None)
        if sync is not None:
            handover.release(sync, self.settings.consumer_group)
        # an old shard's entry ids, compared with another key's from now on, would order nothing
        # (they are clock readings): a stream that changed keys forgets its last ids, and the
        # tombstones (ids of the old shards) and the offset of the hand-over's entries are dropped
        for sid, rec in self.records.items():
            if handover.old_key(sid) != self.settings.input_stream:
                rec.last_entry_id = rec.last_read_entry_id = None
        self.deleted.load({})
        self.offset = InputOffset()

    def run(self) -> None:
        """The lockstep loop; returns once the ranks agreed to stop. ``DistributedError`` (RankLost:
        a peer died or stalled) propagates: the caller exits non-zero."""
        logger.info("rank %d of %d running on %s", self.rank, self.world, self.learner.device)
        drain_until: float | None = None  # set when the stop is agreed: answer what is in hand first
        while True:
            self.checkpoints.settle()  # a write that ended: answer its commands (a lost rank raises)
            for ctl in self.broker.commands():
                self._command(ctl)
            draining = drain_until is not None
            batch, controls = self.batcher.gather(self._receive, _never if draining else self._stop.is_set)
            over = drain_until is not None and time.monotonic() >= drain_until
            more = draining and not over and self._unanswered()
            agreed = self._agree(
                rows=bool(batch),
                stop=self._stop.is_set() or draining,
                checkpoint=self.checkpoints.want,
                writing=self.checkpoints.writing,
                more=more,
                over=over,  # bounds the drain while fixations keep arriving
            )
            if agreed.rows:
                start = time.perf_counter()
                self._lockstep_tick(batch)
                if batch:
                    self.rate.observe(len(batch), time.perf_counter() - start)
            for ctl in controls:
                self._command(ctl)
            done = draining and (agreed.over or not (agreed.rows or agreed.more))
            if done:  # every rank: after the write in flight, the final checkpoint, waited for
                self.checkpoints.quietly("at stop")
            elif agreed.checkpoint and not agreed.writing and self.settings.checkpoint_path is not None:
                self.checkpoints.begin()  # every rank: the snapshot now, the write beside the loop
            self._housekeeping()
            if agreed.stop and not draining:
                drain_until = time.monotonic() + DRAIN_S
                logger.info("rank %d: stopping; answering the fixations in hand first", self.rank)
            if done:
                logger.info("rank %d: the ranks agreed to stop", self.rank)
                return

    def _unanswered(self) -> bool:
        """Whether this rank holds, or its shard has, fixations not answered yet (the stop's drain):
        read fresh from the broker, past this rank's input offset."""
        return self.batcher.held > 0 or self.broker.unanswered_after(self.offset.text)

    def _agree(
        self,
        *,
        rows: bool,
        stop: bool,
        checkpoint: bool = False,
        writing: bool = False,
        more: bool = False,
        over: bool = False,
    ) -> Agreement:
        """One ``all_reduce`` (max) of this rank's six flags: what any rank wants, every rank does."""
        assert self.sync is not None
        flags = torch.tensor(
            [rows, stop, checkpoint, writing, more, over], dtype=torch.int32, device=self.learner.device
        )
        self.sync._collective(
            "the iteration's agreement",
            lambda: dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group),
        )
        return Agreement(*(bool(v) for v in flags.tolist()))

    # ------------------------------------------------------------------ one tick on every rank

    def _lockstep_tick(self, batch: list[Fixation]) -> None:
        """This rank's part of a learning tick: its fixations (``Worker._tick`` screens them, then
        ``_apply`` takes exactly one tick), or an idle tick when it has none. Fixations of another
        rank's streams are refused."""
        mine = [f for f in batch if rank_of(f.stream_id, self.world) == self.rank]
        if len(mine) < len(batch):
            self._refuse_misrouted([f for f in batch if rank_of(f.stream_id, self.world) != self.rank])
        if mine:
            self._tick(mine)
        else:
            with self._lock:
                self._idle()

    def _refuse_misrouted(self, fixes: list[Fixation]) -> None:
        """A fixation written to this rank's shard for a stream of another rank (a rig that wrote
        Redis directly, by the wrong rule or world size) would start a second state of its stream
        here: refused, naming the shard to write it to."""
        replies = []
        for fix in fixes:
            owner = rank_of(fix.stream_id, self.world)
            where = shard_key(self.settings.input_stream.rsplit(":", 1)[0], owner)
            error = InputError(
                f"stream {fix.stream_id[:140]!r} belongs to rank {owner} of {self.world}, not {self.rank}: "
                f"write its fixations to {where} (service.shards.rank_of(stream_id, {self.world}))"
            )
            replies.append(self._refuse(fix, error))
        self.broker.reply(replies)
        self.offset.answered([fix.entry_id for fix in fixes])

    def _idle(self) -> TickOutput:
        """This rank's part of a tick it has no fixations for. The group's update is applied here
        too, and counted: every rank's ``foveate_updates_total`` is the group's (a dashboard takes
        one rank's), not the updates of the ticks in which this rank had fixations."""
        out = idle_tick(self.learner)
        if out.updated:
            metrics.UPDATES.inc()
        return out

    def _apply(self, accepted: list[Accepted]) -> list[tuple[Message, dict[str, Any]]]:
        """Exactly one learning tick: on the fixations whose features could be computed, else idle."""
        good, replies = self._encode(accepted)
        if not good:
            self._idle()
            return replies
        return replies + super()._apply(good)

    def _encode(
        self, accepted: list[Accepted]
    ) -> tuple[list[Accepted], list[tuple[Message, dict[str, Any]]]]:
        """The trunk features of the admitted fixations, computed here without any collective, so a
        bad fixation is found and answered before the tick instead of failing it (``_features``)."""
        replies: list[tuple[Message, dict[str, Any]]] = []
        if not accepted:
            return [], replies
        try:
            rows = list(self._features_of([a.fix for a in accepted]))
            pairs = list(zip(accepted, rows, strict=True))
        except FoveateError:
            pairs = []
            for one in accepted:  # find the bad one(s): local work only
                try:
                    pairs.append((one, self._features_of([one.fix])[0]))
                except FoveateError as exc:
                    replies.append(self._refuse(one.fix, exc))
        except Exception as exc:  # a torch failure (out of memory), or any other: answer, keep in step
            logger.error("computing the trunk features of %d fixations failed", len(accepted), exc_info=exc)
            return [], [self._refuse(a.fix, WorkerError(f"the learner failed: {exc}")) for a in accepted]
        good: list[Accepted] = []
        features: list[torch.Tensor] = []
        for one, row in pairs:
            if bool(torch.isfinite(row).all()):
                good.append(one)
                features.append(row)
            else:
                bad = InputError("the trunk's features of this patch are not finite")
                replies.append(self._refuse(one.fix, bad))
        self._features = torch.stack(features) if features else None  # (B, M)
        return good, replies

    def _features_of(self, fixes: list[Fixation]) -> torch.Tensor:
        """Trunk features (B, M) of the fixations' patches, as ``StreamLearner.tick`` computes them."""
        learner = self.learner
        patches: Any = [f.patch for f in fixes]
        if len({p.shape for p in patches}) == 1:
            patches = np.stack(patches)  # (B, P, P, 3) uint8
        if learner.cfg.trunk == "none":
            x = torch.as_tensor(np.asarray(patches)).to(learner.device, learner.dtype)
        else:
            x = preprocess(patches, learner.cfg.input_size, device=learner.device, dtype=learner.dtype)
        with torch.no_grad():
            return learner.model.encode(x)  # (B, M)

    @staticmethod
    def _refuse(fix: Fixation, exc: Exception) -> tuple[Message, dict[str, Any]]:
        metrics.REJECTED_MESSAGES.labels(reason=reject_reason(exc)).inc()
        logger.info("rejected fixation of %r: %s", fix.stream_id[:140], exc)
        return fix, failure(exc)

    def _learner_tick(self, fixes: list[Fixation]) -> Any:
        """The collective tick on the features ``_encode`` computed for exactly these fixations."""
        assert self.sync is not None and self._features is not None
        features, self._features = self._features, None
        self._ticks_before = self.sync.ticks
        return self.learner.tick_features(
            [f.stream_id for f in fixes], features, reset=[f.reset for f in fixes]
        )

    def _failed_tick(self, accepted: list[Accepted], exc: Exception) -> list[tuple[Message, dict[str, Any]]]:
        """Never the single worker's one-at-a-time retry (several ticks on this rank alone): a tick
        that failed before its collectives becomes an idle tick and its fixations get the error; one
        that failed inside them cannot be repaired, so the rank stops (``DistributedError``)."""
        assert self.sync is not None
        if isinstance(exc, DistributedError):
            raise exc
        if self.sync.ticks != self._ticks_before:
            raise DistributedError(
                f"rank {self.rank}: the learner failed inside learning tick {self.sync.ticks}, after its "
                f"collectives began, so the ranks are out of step; exiting for a restart ({exc})"
            ) from exc
        logger.error("rank %d: the learner refused a tick of %d fixations; an idle tick keeps the ranks "
                     "in step", self.rank, len(accepted), exc_info=exc)  # fmt: skip
        self._idle()
        error = exc if isinstance(exc, FoveateError) else WorkerError(f"the learner failed: {exc}")
        return [self._refuse(a.fix, error) for a in accepted]

    # ------------------------------------------------------------------ commands

    def model_info(self) -> dict[str, Any]:
        """``Worker.model_info`` and this rank's place: rank, world size, and the SHA-256 of the
        shared state (weights, optimizer, statistics), equal on every rank of a healthy group."""
        info = super().model_info()
        sync = self.sync
        info["distributed"] = {
            "rank": self.rank,
            "world_size": self.world,
            "fingerprint": fingerprint(self.learner).hex(),
            "learning_ticks": 0 if sync is None else sync.ticks,
            "collective_seconds": 0.0 if sync is None else round(sync.collective_s, 3),
        }
        return info


__all__ = ["DRAIN_S", "Agreement", "DistWorker"]
