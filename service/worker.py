"""The learning worker: holds the learner and every stream's state, one learner tick per loop.

Each loop iteration

1. gathers up to ``max_batch`` fixations within ``max_wait_ms`` of the first, **at most one per
   stream**, keeping each stream's order (the policy is service/batching.py's ``TickBatcher``);
2. runs one ``learner.tick`` on the stacked patches (decoded earlier, off this thread: by the API for
   HTTP, by the broker's decode pool for Redis messages);
3. publishes one reply per fixation and only then lets the broker acknowledge them;
4. answers commands (reset, delete, checkpoint, queries) that arrived, after the tick: the broker
   hands them over ahead of any fixation still queued, so a command waits for one tick at most;
5. every second writes the heartbeat (with the backlog and the measured service rate, from which
   the API's ``/readyz`` and ``Retry-After`` are computed: service/backpressure.py) and the queue
   gauges; every ``diagnostics_interval_s`` the learner's diagnostics; every
   ``checkpoint_interval_s`` a checkpoint (and one on stop): the loop pauses for its in-memory
   snapshot only, a thread writes it (service/checkpointer.py).

A bad message is answered with its error, counted, acknowledged, and never stops the loop.

Exactly once. A fixation is applied at most once per ``(stream_id, seq)``: before a tick each
fixation goes through the rule of service/dedup.py, and a retry is answered with its original result
instead of being applied again. Over Redis, the worker also keeps the *input offset*: the greatest
entry id up to which every entry it read has been answered. A checkpoint saves it atomically with
the weights, the stream states and each stream's last seq, cached results and last entry id; a
restarted worker (any consumer name) has the broker re-read every entry after it, in order, so the
fixations applied after the checkpoint are applied again and those before it are recognised as
duplicates. A reset or delete command is not in the input stream, so it is answered only once a
checkpoint taken after it has committed (as is the ``checkpoint`` command); the loop learns on
meanwhile.

Examples
--------
>>> worker = Worker(Settings(), LocalBroker(Settings()))  # doctest: +SKIP
>>> worker.start(); ...; worker.stop()                     # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import numpy as np
import torch

from learner.errors import ConfigError, FoveateError, InputError
from learner.streaming import StreamLearner, resolve_device
from service import live, metrics
from service.backpressure import ServiceRate
from service.batching import TickBatcher
from service.broker import Broker, Message
from service.checkpointer import Checkpointer, WriteJob
from service.commands import HANDLERS, TAKE_THEIR_OWN_LOCK
from service.config import Settings
from service.decode import decode_source
from service.dedup import APPLY, Decision, decide, fingerprint
from service.errors import TooManyStreams, WorkerError
from service.messages import Command, Control, Fixation
from service.replies import failure, fixation_scores, reject_reason
from service.streams import EntryKey, StreamRecord, entry_before, entry_key, entry_text

logger = logging.getLogger(__name__)

_TOMBSTONES = 10_000  # deleted streams remembered, so that a re-read entry does not bring one back


def build_learner(settings: Settings) -> StreamLearner:
    """The learner the settings describe, on ``auto`` → CUDA when available, else the CPU."""
    cfg = settings.model_config_obj()
    device = resolve_device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("FOVEATE_DEVICE=cuda but torch sees no CUDA device; use auto or cpu")
    if settings.learner == "bptt":
        from learner.bptt import BPTTLearner

        return BPTTLearner(cfg, device=device, window=settings.bptt_window)
    from learner.rfp import RFPLearner

    return RFPLearner(cfg, device=device)


def torch_threads(settings: Settings) -> int:
    """The learner's CPU threads: ``torch_threads``, or when 0 every core this process may use but one.

    The one left over is for the API's event loop, the decode threads and Redis, whether they share
    this process (``serve``) or only the machine (a compose stack): on 2 cores torch's default of 2
    threads spun against them and made a 64-stream run 14 times slower (docs/deploy.md, Threads).
    """
    if settings.torch_threads:
        return settings.torch_threads
    try:
        cores = len(os.sched_getaffinity(0))  # what a container's cpuset allows, not the host's count
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, cores - 1)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


class _Accepted(NamedTuple):
    """A fixation to apply in this tick, with its rule's decision and its image's fingerprint."""

    fix: Fixation
    decision: Decision
    print_: int


class Worker:
    """Owns the learner; consumes fixations and commands from a broker (see the module docstring).

    Parameters
    ----------
    settings
        Batching, limits, checkpoint path and interval, and the model.
    broker
        Where fixations and commands come from and replies go.
    learner
        A ready learner; built from ``settings`` when ``None``.
    """

    def __init__(self, settings: Settings, broker: Broker, learner: StreamLearner | None = None) -> None:
        self.settings = settings
        self.broker = broker
        self.learner = learner if learner is not None else build_learner(settings)
        self.records: dict[str, StreamRecord] = {}
        self.last_checkpoint: dict[str, Any] | None = None
        # Redis entry ids (service/streams.py entry_key): the input offset, below which every entry
        # read has been answered; the entries received but not answered yet; the greatest answered
        self._through: EntryKey | None = None
        self._open: set[EntryKey] = set()
        self._answered_max: EntryKey | None = None
        # deleted streams' last applied entry: a re-read entry must not bring them back (the newest
        # _TOMBSTONES deletions are kept)
        self._deleted: dict[str, EntryKey] = {}
        self._saved_offset: str | None = None  # the restored checkpoint's input offset
        self.batcher = TickBatcher(settings.max_batch, settings.max_wait_ms / 1000.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_beat = self._last_diag = 0.0
        self._last_ckpt = time.monotonic()
        self._lock = threading.Lock()  # one tick, command or checkpoint snapshot at a time
        self._writer = Checkpointer()  # writes the snapshots beside the loop
        # commands answered after a commit (checkpoint; reset and delete over Redis): those waiting
        # for the next checkpoint, and the write in flight with those waiting for it
        self._after_commit: list[tuple[Control, dict[str, Any] | None]] = []
        self._committing: tuple[WriteJob, list[tuple[Control, dict[str, Any] | None]]] | None = None
        # called by the writer with "rows" and "commit" (learner/checkpoint.py write_snapshot): tests
        # hold a write there to show that ticks go on meanwhile, or fail it
        self.checkpoint_stage: Callable[[str], None] | None = None
        self.rate = ServiceRate()  # fixations answered per second of tick time
        self.started = False
        self.max_resident = self._limit_memory()

    def _limit_memory(self) -> int:
        """Cap the streams' state at ``max_state_mb``; spill beyond it next to the checkpoint."""
        s = self.settings
        path = s.checkpoint_path
        spill = None if path is None or not self.learner.can_spill else path.with_name(path.name + ".spill")
        streams = self.learner.limit_memory(s.max_state_mb * 2**20, spill)
        if spill is not None and streams < s.max_batch:
            raise ConfigError(
                f"FOVEATE_MAX_STATE_MB={s.max_state_mb} holds {streams} streams, fewer than one tick's "
                f"FOVEATE_MAX_BATCH={s.max_batch}: raise it"
            )
        logger.info("stream state: at most %d streams resident (%d MB)%s", streams, s.max_state_mb,
                    "" if spill is None else f", the others spilled to {spill}")  # fmt: skip
        return streams

    # ------------------------------------------------------------------ life cycle

    def start(self, *, thread: bool = True) -> None:
        """Restore the checkpoint if there is one, start receiving (a Redis broker first re-reads what
        came after the checkpoint), and (``thread``) run in a thread."""
        restored = self.restore()
        if self.settings.checkpoint_path is not None:
            from learner.checkpoint import trunk_fingerprint

            trunk_fingerprint(self.learner)  # cached: not computed during a checkpoint's stall
        torch.set_num_threads(torch_threads(self.settings))
        offset = self.broker.start_worker(self._decode, after=self._saved_offset)
        self._through = entry_key(offset)
        if offset is not None and not restored:
            # the starting point: a crash before the first periodic checkpoint re-reads from here
            self._checkpoint_quietly("at start")
        metrics.WORKER_UP.set(1)
        dev = self.learner.device.type
        metrics.WORKER_INFO.labels(learner=self.settings.learner, device=dev, trunk=self.settings.trunk).set(
            1
        )
        self._heartbeat()
        self.started = True
        if thread:
            self._thread = threading.Thread(target=self.run, name="foveate-worker", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """The loop; returns after :meth:`request_stop`."""
        logger.info("worker running on %s: %d streams, %d updates applied",
                    self.learner.device, len(self.records), self.learner.updates_applied)  # fmt: skip
        while not self._stop.is_set():
            for ctl in self.broker.commands():  # those that came during the last tick: before the next
                self._command(ctl)
            batch, controls = self.batcher.gather(self._receive, self._stop.is_set)
            if batch:
                start = time.perf_counter()
                self._tick(batch)
                self.rate.observe(len(batch), time.perf_counter() - start)
            for ctl in controls:
                self._command(ctl)
            self._settle_commits()
            self._housekeeping()

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self, *, checkpoint: bool = True) -> None:
        """Stop the loop, write a final checkpoint, and close the broker's worker side."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        while self._committing is not None or self._after_commit:  # commands waiting for a commit
            self._writer.wait()
            self._settle_commits()
        self.broker.stop_worker()
        if checkpoint and self.settings.checkpoint_path is not None and self.started:
            self.checkpoint()
        self._writer.wait()
        metrics.WORKER_UP.set(0)
        self.started = False

    @property
    def alive(self) -> bool:
        return self.started and (self._thread is None or self._thread.is_alive())

    # ------------------------------------------------------------------ checkpoints

    def restore(self) -> bool:
        """Load ``checkpoint_path`` if it exists; ``ArchitectureMismatch``, ``CheckpointError`` propagate."""
        from learner.checkpoint import has_checkpoint, load_checkpoint

        path = self.settings.checkpoint_path
        if path is None or not has_checkpoint(path):
            logger.info("no checkpoint at %s: starting fresh", path)
            return False

        extra = load_checkpoint(path, self.learner)
        saved = extra.get("service", {})
        self.records = {sid: StreamRecord.from_dict(rec) for sid, rec in saved.get("records", {}).items()}
        self._saved_offset = saved.get("input_offset")
        deleted = {sid: entry_key(eid) for sid, eid in saved.get("deleted", {}).items()}
        self._deleted = {sid: key for sid, key in deleted.items() if key is not None}
        for sid in self.learner.stream_ids():
            self.records.setdefault(sid, StreamRecord(sid))
        for sid in [s for s in self.records if s not in set(self.learner.stream_ids())]:
            del self.records[sid]
        self.last_checkpoint = saved.get("checkpoint")
        metrics.ACTIVE_STREAMS.set(len(self.records))
        return True

    def checkpoint(self, *, wait: bool = True) -> dict[str, Any] | None:
        """Checkpoint everything to ``checkpoint_path``: learning pauses for the snapshot only.

        ``wait``: return what was written once the manifest is committed (after the write in
        flight, if any). Otherwise (the periodic checkpoint) return at once, None; and skip it when a
        write is in flight already (learner/checkpoint.py, service/checkpointer.py).
        """
        if self.settings.checkpoint_path is None:
            raise ConfigError("checkpoints are disabled: set FOVEATE_CHECKPOINT_PATH")
        if not wait and self._writer.busy:
            return None
        self._writer.wait()
        job = self._start_checkpoint(background=not wait)
        return job.result() if wait else None

    def _start_checkpoint(self, *, background: bool) -> WriteJob:
        """Take the snapshot (under the lock: the only pause of learning) and start writing it."""
        path = self.settings.checkpoint_path
        assert path is not None
        from learner.checkpoint import take_snapshot, write_snapshot

        with self._lock:
            start, written_at = time.perf_counter(), time.time()
            info: dict[str, Any] = {"path": str(path), "written_at": written_at,
                                    "updates_applied": self.learner.updates_applied,
                                    "streams": len(self.records)}  # fmt: skip
            records = {s: r.to_dict() for s, r in self.records.items()}
            through = self._through
            service = {
                "records": records,
                "checkpoint": dict(info),
                "input_offset": None if through is None else entry_text(through),
                "deleted": {sid: entry_text(key) for sid, key in self._deleted.items()},
            }
            snap = take_snapshot(path, self.learner, {"service": service})
            info["stall_seconds"] = time.perf_counter() - start
        metrics.CHECKPOINT_STALL_SECONDS.observe(info["stall_seconds"])
        self._last_ckpt = time.monotonic()

        def write() -> dict[str, Any]:  # in the writer's thread
            written = write_snapshot(snap, self.checkpoint_stage)
            info.update(written)
            info["seconds"] = written["write_seconds"]
            metrics.CHECKPOINT_SECONDS.observe(written["write_seconds"])
            metrics.CHECKPOINT_BYTES.set(written["bytes"])
            metrics.CHECKPOINT_WRITTEN_BYTES.set(written["bytes_written"])
            metrics.CHECKPOINTS.inc()
            metrics.LAST_CHECKPOINT.set(written_at)
            self.last_checkpoint = info
            return info

        return self._writer.submit(write, background=background)

    def _settle_commits(self) -> None:
        """Answer the commands that waited for a commit, and start the checkpoint the next ones wait
        for: the loop goes on learning meanwhile (called from the loop, and at stop)."""
        if self._committing is not None:
            job, waiting = self._committing
            if not job.done.is_set():
                return
            self._committing = None
            self.broker.reply([(ctl, self._committed(job, payload)) for ctl, payload in waiting])
        if self._after_commit and not self._writer.busy:
            waiting, self._after_commit = self._after_commit, []
            try:
                job = self._start_checkpoint(background=False)
            except (FoveateError, OSError) as exc:
                failed = WriteJob(lambda: {})
                failed.error, failed.waited = exc, True
                failed.done.set()
                logger.error("checkpoint for %d waiting command(s) failed: %s", len(waiting), exc)
                self.broker.reply([(ctl, self._committed(failed, payload)) for ctl, payload in waiting])
                return
            job.waited = True  # its error goes into the replies
            self._committing = (job, waiting)

    @staticmethod
    def _committed(job: WriteJob, payload: dict[str, Any] | None) -> dict[str, Any]:
        """The reply of a command that waited for ``job``: the checkpoint command gets what was
        written (or the error); a reset or delete its own answer (its checkpoint failing is logged,
        retried at the next interval, and does not undo it)."""
        if payload is not None:
            return payload
        if job.error is not None:
            err = job.error
            return failure(err if isinstance(err, Exception) else RuntimeError(str(err)))
        return {"ok": True, "checkpoint": job.info}

    # ------------------------------------------------------------------ gathering

    def _decode(self, fix: Fixation) -> None:
        """Fill ``fix.patch`` from ``fix.source`` (runs in the broker's decode threads)."""
        if fix.source is None:
            fix.problem = InputError("the fixation carries no image")
            return
        try:
            s = self.settings
            fix.patch = decode_source(
                fix.source, max_pixels=s.max_pixels, size=s.input_size, max_patch_px=s.max_patch_px
            )
        except FoveateError as exc:
            fix.problem = exc
        fix.source = None  # the encoded bytes are not needed any more

    def _held_count(self) -> int:
        return self.batcher.held

    def _receive(self, timeout: float) -> Message | None:
        """The broker's next message; a fixation's Redis entry stays open until it is answered."""
        msg = self.broker.get(timeout)
        if isinstance(msg, Fixation):
            key = entry_key(msg.entry_id)
            if key is not None:
                self._open.add(key)
        return msg

    # ------------------------------------------------------------------ ticks

    def _tick(self, batch: list[Fixation]) -> None:
        replies: list[tuple[Message, dict[str, Any]]] = []
        accepted: list[_Accepted] = []
        with self._lock:
            for fix in batch:
                problem = fix.problem
                if problem is None and fix.patch is None:
                    problem = InputError("the fixation carries no decoded image")
                patch = fix.patch
                print_ = 0 if patch is None or problem is not None or fix.seq is None else fingerprint(patch)
                decision = APPLY if problem is not None else self._decide(fix, print_)
                if decision.action == "reused":
                    problem = InputError(
                        f"seq {fix.seq} of stream {fix.stream_id!r} was already applied with another "
                        "image: number a stream's fixations 0, 1, 2, ... without reusing one, or reset the "
                        "stream (POST /v1/streams/{id}/reset, or reset=true) to number it afresh"
                    )
                elif decision.action != "apply":
                    metrics.DUPLICATES.inc()
                    replies.append((fix, self._repeat(fix, decision)))
                    continue
                if problem is None:
                    problem = self._admission(fix, sum(a.fix.stream_id not in self.records for a in accepted))
                if problem is not None:
                    metrics.REJECTED_MESSAGES.labels(reason=reject_reason(problem)).inc()
                    logger.info("rejected fixation of %r: %s", fix.stream_id[:140], problem)
                    replies.append((fix, failure(problem)))
                else:
                    accepted.append(_Accepted(fix, decision, print_))
            replies.extend(self._apply(accepted))
        self.broker.reply(replies)
        self._answered(batch)

    def _answered(self, batch: list[Fixation]) -> None:
        """Advance the input offset past the entries just answered (see the module docstring)."""
        for fix in batch:
            key = entry_key(fix.entry_id)
            if key is not None:
                self._open.discard(key)
                if self._answered_max is None or key > self._answered_max:
                    self._answered_max = key
        # Entries arrive in id order (the broker reads them so), so everything below the oldest one
        # still open has been answered; stale entries claimed late are below the offset already.
        done = entry_before(min(self._open)) if self._open else self._answered_max
        if done is not None and (self._through is None or done > self._through):
            self._through = done

    def _decide(self, fix: Fixation, print_: int) -> Decision:
        """Apply, or answer as a duplicate (service/dedup.py); a re-delivered Redis entry is a duplicate."""
        rec = self.records.get(fix.stream_id)
        key = entry_key(fix.entry_id)
        if rec is None:
            gone = self._deleted.get(fix.stream_id)
            if gone is not None and key is not None and key <= gone:
                return Decision("already_applied")  # applied, then the stream was deleted
            return APPLY
        if rec.is_replay(fix.entry_id):
            original = None if fix.seq is None else rec.results.get(fix.seq)
            if original is not None and original["fingerprint"] == print_:
                return Decision("duplicate", original=original)
            return Decision("already_applied")
        return decide(rec.last_seq, rec.results, fix.seq, print_, fix.reset)

    def _repeat(self, fix: Fixation, decision: Decision) -> dict[str, Any]:
        """The answer to a fixation that was applied before: its original result, or "already applied"."""
        rec = self.records.get(fix.stream_id)
        payload: dict[str, Any] = {"ok": True, "stream_id": fix.stream_id, "seq": fix.seq}
        original = decision.original
        if original is None:
            logger.info("fixation seq %s of %r was already applied", fix.seq, fix.stream_id[:140])
            payload.update(status="already_applied", step=None, **fixation_scores(math.nan, math.nan, False))
            running = None if rec is None else rec.running_error
            payload.update(gap=0, running_error=running, updates_applied=self.learner.updates_applied)
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
            pred = self.learner.prediction(fix.stream_id)  # still the one made at this fixation
            if pred is not None:
                payload["prediction"] = pred.detach().cpu().tolist()
        return payload

    def _admission(self, fix: Fixation, new_in_tick: int) -> Exception | None:
        rec = self.records.get(fix.stream_id)
        if rec is None and len(self.records) + new_in_tick >= self.settings.max_streams:
            return TooManyStreams(
                f"the worker holds {len(self.records)} streams (FOVEATE_MAX_STREAMS); delete idle ones first"
            )
        if rec is None and not self.learner.states.can_admit(new_in_tick + 1):
            return TooManyStreams(
                f"the state of {self.learner.states.resident} streams fills FOVEATE_MAX_STATE_MB="
                f"{self.settings.max_state_mb}; delete idle streams, raise it, or set "
                "FOVEATE_CHECKPOINT_PATH so that idle streams spill to disk"
            )
        return None

    def _apply(self, accepted: list[_Accepted]) -> list[tuple[Message, dict[str, Any]]]:
        if not accepted:
            return []
        fixes = [a.fix for a in accepted]
        ids = [f.stream_id for f in fixes]
        patches: Any = [f.patch for f in fixes]
        if len({p.shape for p in patches}) == 1:
            patches = np.stack(patches)  # (B, P, P, 3) uint8: the learner takes it without resizing
        start = time.perf_counter()
        try:
            out = self.learner.tick(ids, patches, reset=[f.reset for f in fixes])
        except FoveateError as exc:
            if len(fixes) == 1:
                metrics.REJECTED_MESSAGES.labels(reason=reject_reason(exc)).inc()
                return [(fixes[0], failure(exc))]
            # Find the bad one: apply each alone, so the others are still learned from.
            return [pair for one in accepted for pair in self._apply([one])]
        except RuntimeError as exc:  # torch failures (out of memory, device lost): answer, keep running
            logger.exception("learner tick failed on %d fixations", len(fixes))
            metrics.REJECTED_MESSAGES.labels(reason="internal").inc(len(fixes))
            return [(f, failure(WorkerError(f"the learner failed: {exc}"))) for f in fixes]
        metrics.UPDATE_SECONDS.observe(time.perf_counter() - start)
        steps = out.step.tolist()
        errors = out.error.tolist()
        repeats = out.repeat_error.tolist()
        skipped = out.skipped.tolist()
        want = [i for i, f in enumerate(fixes) if f.return_prediction]
        preds = out.prediction[want].detach().cpu().tolist() if want else []
        pred_of = dict(zip(want, preds, strict=True))
        updates = self.learner.updates_applied
        replies: list[tuple[Message, dict[str, Any]]] = []
        for i, (fix, decision, print_) in enumerate(accepted):
            rec = self.records.get(fix.stream_id)
            if rec is None:
                rec = self.records[fix.stream_id] = StreamRecord(fix.stream_id)
                self._deleted.pop(fix.stream_id, None)
            if fix.reset:
                rec.resets += 1
                metrics.RESETS.inc()
            if decision.new_run:
                rec.forget_seq()
            if decision.gap:
                metrics.SEQ_GAPS.inc()
                metrics.SEQ_MISSING.inc(decision.gap)
            rec.observe(step=steps[i], error=errors[i], seq=fix.seq, t=fix.t, entry_id=fix.entry_id,
                        repeat_error=repeats[i], skipped=skipped[i])  # fmt: skip
            payload: dict[str, Any] = {
                "ok": True,
                "stream_id": fix.stream_id,
                "seq": fix.seq,
                "status": "applied",
                "step": steps[i],
                **fixation_scores(errors[i], repeats[i], skipped[i]),
                "running_error": rec.running_error,
                "updates_applied": updates,
                "gap": decision.gap,
                "request_id": fix.request_id,
            }
            if fix.seq is not None:
                rec.results.put({**payload, "fingerprint": print_, "error": _number(errors[i]),
                                 "repeat_error": _number(repeats[i])})  # fmt: skip
            if i in pred_of:
                payload["prediction"] = pred_of[i]
            replies.append((fix, payload))
        metrics.observe_tick(steps, errors, repeats, skipped, out.trace_radius)
        try:  # the live page's ring buffers: never at the cost of the replies of an applied tick
            live.FEED.observe(ids, [f.patch for f in fixes], steps=steps, errors=errors,
                              repeat_errors=repeats, seqs=[f.seq for f in fixes])  # fmt: skip
        except Exception:
            logger.warning("live page feed failed on a tick; the page may miss it", exc_info=True)
        metrics.FIXATIONS.inc(len(fixes))
        metrics.BATCH_SIZE.observe(len(fixes))
        if out.updated:
            metrics.UPDATES.inc()
        metrics.ACTIVE_STREAMS.set(len(self.records))
        return replies

    # ------------------------------------------------------------------ commands

    def _command(self, ctl: Control) -> None:
        checkpoints = self.settings.checkpoint_path is not None
        if ctl.command == "checkpoint" and checkpoints:
            self._after_commit.append((ctl, None))  # answered after the commit, the loop going on
            return
        try:
            payload = {"ok": True, **self.execute(ctl.command, ctl.args)}
        except FoveateError as exc:
            metrics.REJECTED_MESSAGES.labels(reason=reject_reason(exc)).inc()
            payload = failure(exc)
        if payload["ok"] and ctl.command in ("reset", "delete") and self._through is not None and checkpoints:
            # Not in the input stream, so a replay after a crash could not repeat it: make it durable
            # before answering (only with a replaying broker: then _through is set).
            self._after_commit.append((ctl, payload))
            return
        self.broker.reply([(ctl, payload)])

    def _checkpoint_quietly(self, when: str, *, wait: bool = True) -> None:
        if self.settings.checkpoint_path is None:
            return
        try:
            self.checkpoint(wait=wait)
        except (FoveateError, OSError) as exc:  # a full disk must not stop learning; retry next interval
            logger.error("checkpoint %s failed: %s", when, exc)

    def execute(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run one command's handler (service/commands.py) on the worker's state, on its thread."""
        handler = HANDLERS.get(cast(Command, command))
        if handler is None:  # a broken control entry arrives as "invalid", naming what it carried
            raise InputError(f"unknown worker command {args.get('command', command)!r}")
        if command in TAKE_THEIR_OWN_LOCK:
            return handler(self, args)
        with self._lock:
            return handler(self, args)

    def reset_stream(self, rec: StreamRecord) -> None:
        """Start the stream afresh: its state, its step count and its seq numbering."""
        self.learner.reset(rec.stream_id)
        rec.resets += 1
        rec.step = 0
        rec.forget_seq()
        metrics.RESETS.inc()

    def delete_stream(self, rec: StreamRecord) -> None:
        """Forget the stream everywhere, remembering its last entry so that a replay cannot revive it."""
        self.learner.drop(rec.stream_id)
        del self.records[rec.stream_id]
        last = entry_key(rec.last_entry_id)
        if last is not None:
            self._deleted[rec.stream_id] = last
            if len(self._deleted) > _TOMBSTONES:
                del self._deleted[next(iter(self._deleted))]
        self.broker.forget_stream(rec.stream_id)
        live.FEED.forget(rec.stream_id)
        metrics.ACTIVE_STREAMS.set(len(self.records))

    def model_info(self) -> dict[str, Any]:
        """Config, parameter counts, counters and the last checkpoint, for ``GET /v1/model``."""
        model = self.learner.model
        counts = model.parameter_counts()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {
            "learner": self.settings.learner,
            "device": str(self.learner.device),
            "config": self.learner.cfg.to_dict(),
            "parameters": counts,
            "trainable_parameters": int(trainable),
            "updates_applied": self.learner.updates_applied,
            "ticks": self.learner.ticks,
            "streams": len(self.records),
            "bytes_per_stream": self.learner.memory_per_stream(),
            "last_checkpoint": self.last_checkpoint,
        }

    # ------------------------------------------------------------------ housekeeping

    def _heartbeat(self) -> None:
        now = time.time()
        self._last_beat = time.monotonic()
        depth = self.broker.backlog() + self._held_count()
        metrics.QUEUE_DEPTH.set(depth)
        metrics.WORKER_HEARTBEAT.set(now)
        states = self.learner.states
        metrics.STATE_BYTES.set(states.allocated_bytes())
        metrics.RESIDENT_STREAMS.set(states.resident)
        metrics.SPILLED_STREAMS.set(states.spilled)
        self.broker.heartbeat({"updates_applied": self.learner.updates_applied, "streams": len(self.records),
                               "queue_depth": depth, "service_rate": self.rate.per_second()})  # fmt: skip

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= 1.0:
            self._heartbeat()
        if now - self._last_diag >= self.settings.diagnostics_interval_s:
            self._last_diag = now
            self._export_diagnostics()
        if (
            self.settings.checkpoint_path is not None
            and now - self._last_ckpt >= self.settings.checkpoint_interval_s
        ):
            self._checkpoint_quietly("periodic", wait=False)  # written beside the loop
            self._last_ckpt = time.monotonic()

    def _export_diagnostics(self) -> None:
        diag = self.learner.diagnostics
        summary = diag.summary()
        z = diag.embeddings()  # (W, D)
        if z.shape[0]:
            summary["embedding_norm"] = float(z.norm(dim=-1).mean())
        metrics.set_diagnostics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
