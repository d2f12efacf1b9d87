"""A re-partition's hand-over: the fixations the old ranks never answered, to the streams' new ranks.

When a group restarts with another number of ranks (service/dist_checkpointer.py), each old shard
``k`` (``foveate:fixations:k``, or a single worker's ``foveate:fixations``) may hold entries after
its writer's saved input offset: fixations applied after the checkpoint (their effect died with the
old ranks, say on SIGKILL) or never read. An entry of an old shard names no rank of the new
partition, so the group hands them over, together, before reading its own shards:

1. **Where each old shard ends.** Rank 0 reads the last entry id of every old shard and tells the
   others (one broadcast): every rank hands over the same ranges ``(offset_k, end_k]``.
2. **Who takes what.** Stream ``s``'s entries go to its new rank ``rank_of(s, world)``. Every rank
   reads every old range and keeps its streams' entries, in two passes that give each stream's
   fixations in the order they were written (entry ids order one key; across keys they are clock
   readings, so they order nothing):

   - *old-layout entries*: those of shard ``k`` whose stream the old partition gave to ``k``
     (``rank_of(s, writers) == k``): a stream has them in that one shard, in entry order;
   - then *new-layout entries*: a key that is a shard of both layouts (``r < min(writers, world)``)
     may also hold entries that an API already switched to the new layout (``FOVEATE_SHARDS`` =
     the new world) wrote there for its streams (``rank_of(s, world) == r``) while no group ran;
     they were written after the stream's old-layout ones (the API switched after the old group
     stopped). Only rank ``r`` takes them.

   An entry that neither layout puts in its key (a rig that wrote Redis by a wrong rule) is answered
   with the error naming the right shard by the key's keeper (rank ``k`` for a shard of both layouts,
   else rank 0).
3. **Applied in lockstep ticks**, before anything else: tick ``i`` holds the ``i``-th handed-over
   fixation of every stream that has one (at most ``max_batch`` streams of a rank), through the
   ordinary screening: the exactly-once rule answers a fixation that the checkpoint already holds as
   a duplicate (by its seq, or by its stream's last entry id, an id of the same old shard here). A
   rank with nothing left ticks idle until every rank is done. The answers acknowledge the entries
   in the key they came from (``Fixation.input_key``).
4. **The consumer groups move past it** (:meth:`Handover.release`): each old shard's group is set
   to deliver after ``end_k`` (``XGROUP SETID``) and its pending entries up to ``end_k`` are
   acknowledged, by the rank that reads the key next (rank 0 for a shard beyond the new world), so
   nothing handed over is read or claimed again; the new rank ``r`` of a shard of both layouts
   resumes it after ``end_r`` (:meth:`Handover.resume_after`), a new shard where its group stands.

What a restart cannot hand over is refused by the restore, not guessed (service/dist_checkpointer.py):
resets and deletes in an old rank's command journal after its writer's saved position.

Not covered: an API still writing by the old layout once the new group has restored. An entry after
``end_k`` in a shard beyond the new world is never read; in a shard of both layouts its new rank
refuses those of other ranks' streams as misrouted. Switch the API, then start the new group.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import ResponseError

from service.messages import Fixation, fixation_from_fields
from service.redis_common import id_text, str_fields
from service.shards import rank_of
from service.streams import entry_key

logger = logging.getLogger(__name__)

_PAGE = 1024  # entries per XRANGE while reading an old shard


@dataclass(frozen=True)
class OldShard:
    """One input key of the layout that wrote the checkpoint, and the part of it to hand over."""

    rank: int  # the writer rank that read it (0 for a single worker's key)
    key: str
    offset: str | None  # the writer's saved input offset: every entry up to it was answered
    end: str | None = None  # its last entry when the group restored (the same on every rank)
    shared: bool = False  # also a shard of the new layout (the same key, read by rank ``rank``)

    def bounds(self) -> tuple[str, str] | None:
        """XRANGE's ``min`` and ``max`` of the entries to hand over, or None when there are none."""
        end, offset = entry_key(self.end), entry_key(self.offset)
        if end is None or (offset is not None and end <= offset):
            return None
        return ("-" if self.offset is None else "(" + self.offset, str(self.end))


@dataclass
class Handover:
    """One rank's part of the hand-over (see the module docstring).

    Parameters
    ----------
    shards
        The old layout's keys, with every rank's agreed ``end``.
    writers, world, rank
        The old number of ranks (1 for a single worker), the new one, and this rank.
    """

    shards: list[OldShard]
    writers: int
    world: int
    rank: int
    queues: dict[str, deque[Fixation]] = field(default_factory=dict)  # stream -> its fixations, in order
    misrouted: list[Fixation] = field(default_factory=list)  # entries of neither layout: refused here
    #: each stream's first new-layout entry (stream, entry id): its ids from there on are another
    #: key's, which the stream's last entry id (an old shard's) must not be compared with
    switches: set[tuple[str, str | None]] = field(default_factory=set)

    @property
    def held(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def old_key(self, stream_id: str) -> str:
        """The key that held the stream's entries in the old layout."""
        return self.shards[rank_of(stream_id, self.writers)].key

    def keeper(self, shard: OldShard) -> int:
        """The rank that answers a shard's stray entries and moves its consumer group."""
        return shard.rank if shard.shared else 0

    def read(self, sync: redis.Redis, decode: Callable[[Fixation], None]) -> None:
        """Read every old shard's range; keep (decoded, in order) this rank's streams' entries."""
        first: dict[str, list[Fixation]] = {}  # old-layout entries, one shard per stream
        then: dict[str, list[Fixation]] = {}  # new-layout entries of a shard of both layouts
        for shard in self.shards:
            for fix in self._entries(sync, shard):
                new = rank_of(fix.stream_id, self.world)
                if rank_of(fix.stream_id, self.writers) == shard.rank:
                    if new == self.rank:
                        first.setdefault(fix.stream_id, []).append(fix)
                elif shard.shared and new == shard.rank:
                    if new == self.rank:
                        then.setdefault(fix.stream_id, []).append(fix)
                elif self.keeper(shard) == self.rank:
                    self.misrouted.append(fix)
        self.switches = {(sid, fixes[0].entry_id) for sid, fixes in then.items()}
        for part in (first, then):
            for sid, fixes in part.items():
                for fix in fixes:
                    if fix.problem is None:
                        decode(fix)
                self.queues.setdefault(sid, deque()).extend(fixes)
        if self.queues or self.misrouted:
            logger.info("rank %d takes over %d unanswered fixations of %d streams from the %d-rank "
                        "layout (%d misrouted)", self.rank, self.held, len(self.queues),
                        self.writers, len(self.misrouted))  # fmt: skip

    def _entries(self, sync: redis.Redis, shard: OldShard) -> list[Fixation]:
        bounds = shard.bounds()
        if bounds is None:
            return []
        low, high = bounds
        _warn_if_trimmed(sync, shard)
        out: list[Fixation] = []
        while True:
            entries: Any = sync.xrange(shard.key, min=low, max=high, count=_PAGE)
            for eid, fields in entries:
                fix = fixation_from_fields(str_fields(fields), id_text(eid))
                fix.input_key = shard.key
                out.append(fix)
            if len(entries) < _PAGE:
                return out
            low = "(" + id_text(entries[-1][0])

    def batch(self, limit: int) -> list[Fixation]:
        """The next tick's fixations: the next one of each stream that has one, ``limit`` at most."""
        out: list[Fixation] = []
        for sid in list(self.queues):
            if len(out) == limit:
                break
            queue = self.queues[sid]
            out.append(queue.popleft())
            if not queue:
                del self.queues[sid]
        return out

    def resume_after(self) -> str | None:
        """Where this rank reads its shard from: after ``end`` of a key of both layouts (all of it
        was handed over), None for a new key (its consumer group says)."""
        if self.rank >= len(self.shards) or not self.shards[self.rank].shared:
            return None
        shard = self.shards[self.rank]
        ends = [k for k in (shard.offset, shard.end) if entry_key(k) is not None]
        return max(ends, key=lambda k: entry_key(k) or (0, 0), default=None)

    def release(self, sync: redis.Redis, group: str) -> None:
        """Move the consumer group of each old shard this rank keeps past its handed-over range."""
        for shard in self.shards:
            if self.keeper(shard) == self.rank and shard.end is not None:
                skip_through(sync, shard.key, group, shard.end)


def _warn_if_trimmed(sync: redis.Redis, shard: OldShard) -> None:
    info = str_fields(sync.xinfo_stream(shard.key))
    deleted, offset = entry_key(id_text(info.get("max-deleted-entry-id") or b"")), entry_key(shard.offset)
    if deleted is not None and deleted > (offset or (0, 0)):
        logger.error(
            "entries of %s after the checkpoint (offset %s) were trimmed or deleted before this "
            "re-partition (up to %s): those fixations are lost; raise FOVEATE_STREAM_MAXLEN or "
            "checkpoint more often (FOVEATE_CHECKPOINT_INTERVAL_S)",
            shard.key, shard.offset, id_text(info["max-deleted-entry-id"]),
        )  # fmt: skip


def skip_through(sync: redis.Redis, key: str, group: str, end: str) -> None:
    """Make ``group`` deliver ``key``'s entries after ``end`` only, and acknowledge its pending ones
    up to ``end`` (answered by the hand-over: not to be claimed again)."""
    try:
        groups: Any = sync.xinfo_groups(key)
    except ResponseError:  # no such key
        return
    infos = [str_fields(g) for g in groups]
    info = next((i for i in infos if id_text(i["name"]) == group), None)
    if info is None:
        sync.xgroup_create(key, group, id=end)
        return
    last = entry_key(id_text(info["last-delivered-id"]))
    target = entry_key(end)
    if last is None or (target is not None and last < target):
        sync.xgroup_setid(key, group, id=end)
    while True:
        pending: Any = sync.xpending_range(key, group, min="-", max=end, count=_PAGE)
        if not pending:
            return
        sync.xack(key, group, *[id_text(p["message_id"]) for p in pending])


def old_ends(sync: redis.Redis, keys: list[str]) -> list[str | None]:
    """The last entry id of each key (None: empty or missing), read once by rank 0."""
    ends: list[str | None] = []
    for key in keys:
        last: Any = sync.xrevrange(key, max="+", min="-", count=1)
        ends.append(id_text(last[0][0]) if last else None)
    return ends


__all__ = ["Handover", "OldShard", "old_ends", "skip_through"]
