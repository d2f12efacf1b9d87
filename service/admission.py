"""Which fixations of a tick the worker applies, and the answers to those it does not.

Before a tick, under the worker's lock, :func:`screen` takes the gathered fixations in order:

1. one that failed to decode is refused with its error;
2. the exactly-once rule (service/dedup.py) on its ``(stream_id, seq)`` and image fingerprint: a
   retry is answered with its original result, or "already applied" when that result is no longer
   kept; a seq that arrives after a later one was applied is answered "late" (not applied); a seq
   reused with another image is refused. A Redis entry re-read after a restart is
   recognised by its stream's last entry id, or by a deleted stream's tombstone (``Worker.deleted``);
3. a new stream is admitted while the worker holds fewer than ``max_streams`` and the state memory
   (``max_state_mb``) can take it; otherwise it is refused with ``TooManyStreams``.

What is left is applied by ``Worker._apply``, in one learner tick.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, NamedTuple

from learner.errors import InputError
from service import metrics
from service.broker import Message
from service.dedup import APPLY, Decision, decide, fingerprint
from service.errors import TooManyStreams
from service.messages import Fixation
from service.replies import failure, fixation_scores, reject_reason

if TYPE_CHECKING:
    from service.worker import Worker

logger = logging.getLogger(__name__)


class Accepted(NamedTuple):
    """A fixation to apply in this tick, with its rule's decision and its image's fingerprint."""

    fix: Fixation
    decision: Decision
    print_: int


def screen(
    worker: Worker, batch: list[Fixation]
) -> tuple[list[Accepted], list[tuple[Message, dict[str, Any]]]]:
    """The fixations of ``batch`` to apply, and the replies to the others (the worker's lock held)."""
    replies: list[tuple[Message, dict[str, Any]]] = []
    accepted: list[Accepted] = []
    for fix in batch:
        problem = fix.problem
        if problem is None and fix.patch is None:
            problem = InputError("the fixation carries no decoded image")
        patch = fix.patch
        print_ = 0 if patch is None or problem is not None or fix.seq is None else fingerprint(patch)
        decision = APPLY if problem is not None else _decide(worker, fix, print_)
        if decision.action == "reused":
            problem = InputError(
                f"seq {fix.seq} of stream {fix.stream_id!r} was already applied with another "
                "image: number a stream's fixations 0, 1, 2, ... without reusing one, or reset the "
                "stream (POST /v1/streams/{id}/reset, or reset=true) to number it afresh"
            )
        elif decision.action != "apply":
            (metrics.SEQ_LATE if decision.action == "late" else metrics.DUPLICATES).inc()
            replies.append((fix, _repeat(worker, fix, decision)))
            continue
        if problem is None:
            problem = _admission(worker, fix, sum(a.fix.stream_id not in worker.records for a in accepted))
        if problem is not None:
            metrics.REJECTED_MESSAGES.labels(reason=reject_reason(problem)).inc()
            logger.info("rejected fixation of %r: %s", fix.stream_id[:140], problem)
            replies.append((fix, failure(problem)))
        else:
            accepted.append(Accepted(fix, decision, print_))
    return accepted, replies


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _decide(worker: Worker, fix: Fixation, print_: int) -> Decision:
    """Apply, or answer as a duplicate (service/dedup.py); a re-delivered Redis entry is a duplicate."""
    rec = worker.records.get(fix.stream_id)
    if rec is None:
        if worker.deleted.covers(fix.stream_id, fix.entry_id):
            return Decision("already_applied")  # applied, then the stream was deleted
        return APPLY
    if rec.is_replay(fix.entry_id):
        original = None if fix.seq is None else rec.results.get(fix.seq)
        if original is not None and original["fingerprint"] == print_:
            return Decision("duplicate", original=original)
        return Decision("already_applied")
    return decide(rec.last_seq, rec.results, fix.seq, print_, fix.reset)


def _repeat(worker: Worker, fix: Fixation, decision: Decision) -> dict[str, Any]:
    """The answer to a fixation not applied now: its original result, "already applied" or "late"."""
    learner = worker.learner
    rec = worker.records.get(fix.stream_id)
    payload: dict[str, Any] = {"ok": True, "stream_id": fix.stream_id, "seq": fix.seq}
    original = decision.original
    if original is None:
        status = "late" if decision.action == "late" else "already_applied"
        logger.info("fixation seq %s of %r: %s, not applied", fix.seq, fix.stream_id[:140], status)
        payload.update(status=status, step=None, **fixation_scores(math.nan, math.nan, False))
        running = None if rec is None else rec.running_error
        payload.update(gap=0, running_error=running, updates_applied=learner.updates_applied)
        payload["request_id"] = fix.request_id
        return payload
    payload.update(
        status="duplicate",
        step=original["step"],
        **fixation_scores(_nan(original["error"]), _nan(original["repeat_error"]), original["skipped"]),
        running_error=original["running_error"],
        updates_applied=original["updates_applied"],
        gap=original["gap"],
        request_id=fix.request_id,
    )
    if fix.return_prediction and rec is not None and rec.last_seq == fix.seq:
        pred = learner.prediction(fix.stream_id)  # still the one made at this fixation
        if pred is not None:
            payload["prediction"] = pred.detach().cpu().tolist()
    return payload


def _admission(worker: Worker, fix: Fixation, new_in_tick: int) -> Exception | None:
    """Why a fixation of a new stream cannot be taken (``new_in_tick`` other new ones before it), if so."""
    records, states, s = worker.records, worker.learner.states, worker.settings
    if fix.stream_id in records:
        return None
    if len(records) + new_in_tick >= s.max_streams:
        return TooManyStreams(
            f"the worker holds {len(records)} streams (FOVEATE_MAX_STREAMS); delete idle ones first"
        )
    if not states.can_admit(new_in_tick + 1):
        return TooManyStreams(
            f"the state of {states.resident} streams fills FOVEATE_MAX_STATE_MB="
            f"{s.max_state_mb}; delete idle streams, raise it, or set "
            "FOVEATE_CHECKPOINT_PATH so that idle streams spill to disk"
        )
    return None
