"""The learning worker: holds the learner and every stream's state, one learner tick per loop.

Each loop iteration

1. gathers up to ``max_batch`` fixations within ``max_wait_ms`` of the first, **at most one per
   stream**, keeping each stream's order (the policy is service/batching.py's ``TickBatcher``);
2. screens them (service/admission.py: exactly once, stream limits) and runs one ``learner.tick``
   on the stacked patches of those admitted (decoded earlier, off this thread: by the API for HTTP,
   by the broker's decode pool for Redis messages);
3. publishes one reply per fixation and only then lets the broker acknowledge them;
4. answers commands (reset, delete, checkpoint, queries: service/commands.py) that arrived, after
   the tick: the broker hands them over ahead of any fixation still queued, so a command waits for
   one tick at most;
5. every second writes the heartbeat (with the backlog and the measured service rate, from which
   the API's ``/readyz`` and ``Retry-After`` are computed: service/backpressure.py) and the queue
   gauges; every ``diagnostics_interval_s`` the learner's diagnostics; every
   ``checkpoint_interval_s`` a checkpoint (and one on stop): the loop pauses for its in-memory
   snapshot only, a thread writes it (service/checkpointer.py ``CheckpointDriver``).

A bad message is answered with its error, counted, acknowledged, and never stops the loop.

Exactly once. A fixation is applied at most once per ``(stream_id, seq)``: before a tick each
fixation goes through the rule of service/dedup.py, and a retry is answered with its original result
instead of being applied again. Over Redis, the worker also keeps the *input offset*
(service/streams.py ``InputOffset``): the greatest entry id up to which every entry it read has been
answered. A checkpoint saves it atomically with the weights, the stream states and each stream's
last seq, cached results and last entry id; a restarted worker (any consumer name) has the broker
re-read every entry after it, in order, so the fixations applied after the checkpoint are applied
again and those before it are recognised as duplicates. A reset or delete command is not in the
input stream: over Redis the worker appends a record of it to the command journal
(service/journal.py) before applying it, and answers at once; a restarted worker applies each record
after its checkpoint at its place among the re-read fixations. The ``checkpoint`` command is
answered after its commit, the loop learning on meanwhile.

Examples
--------
>>> worker = Worker(Settings(), LocalBroker(Settings()))  # doctest: +SKIP
>>> worker.start(); ...; worker.stop()                     # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from learner.errors import FoveateError, InputError
from learner.streaming import StreamLearner
from service import live, metrics
from service.admission import Accepted, screen
from service.backpressure import ServiceRate
from service.batching import TickBatcher
from service.broker import Broker, Message
from service.checkpointer import CheckpointDriver
from service.commands import HANDLERS, TAKE_THEIR_OWN_LOCK
from service.config import Settings
from service.decode import decode_fixation
from service.errors import WorkerError
from service.journal import JOURNALED, JournalDriver
from service.learner_setup import build_learner, limit_memory, spill_folder, torch_threads
from service.messages import Command, Control, Fixation
from service.replies import failure, fixation_scores, reject_reason
from service.streams import InputOffset, StreamRecord, Tombstones, entry_key

logger = logging.getLogger(__name__)


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


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
        self.offset = InputOffset()  # over Redis: every entry up to it has been answered
        self.deleted = Tombstones()  # a re-read Redis entry must not bring a deleted stream back
        self._saved_offset: str | None = None  # the restored checkpoint's input offset
        self.batcher = TickBatcher(settings.max_batch, settings.max_wait_ms / 1000.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_beat = self._last_diag = 0.0
        self._lock = threading.Lock()  # one tick, command or checkpoint snapshot at a time
        # restores and takes checkpoints; holds the checkpoint commands answered after their commit
        self.checkpoints = CheckpointDriver(self, self._lock)
        # over Redis: a reset or delete is written to the command journal before it is applied
        self.journal = JournalDriver(self, self._lock)
        # called by the writer with "rows" and "commit" (learner/checkpoint.py write_snapshot): tests
        # hold a write there to show that ticks go on meanwhile, or fail it
        self.checkpoint_stage: Callable[[str], None] | None = None
        self.rate = ServiceRate()  # fixations answered per second of tick time
        self.started = False
        self.max_resident = limit_memory(self.learner, settings, self.spill_folder())

    def spill_folder(self) -> Path | None:
        """Where the streams beyond the memory cap wait (service/learner_setup.py ``spill_folder``)."""
        return spill_folder(self.settings)

    # ------------------------------------------------------------------ life cycle

    def start(self, *, thread: bool = True) -> None:
        """Restore the checkpoint if there is one, start receiving (a Redis broker first re-reads what
        came after the checkpoint), and (``thread``) run in a thread."""
        torch.set_num_threads(torch_threads(self.settings))  # before a restore that may learn (a hand-over)
        restored = self.restore()
        if self.settings.checkpoint_path is not None:
            from learner.checkpoint import trunk_fingerprint

            trunk_fingerprint(self.learner)  # cached: not computed during a checkpoint's stall
        offset = self.broker.start_worker(self.decoder(), after=self._saved_offset)
        self.offset.through = entry_key(offset)
        self.journal.start(restored=restored)
        if offset is not None and not restored:
            # the starting point: a crash before the first periodic checkpoint re-reads from here
            self.checkpoints.quietly("at start")
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
            self.checkpoints.settle()
            self._housekeeping()

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self, *, checkpoint: bool = True) -> None:
        """Stop the loop, write a final checkpoint, and close the broker's worker side."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        self.checkpoints.drain()  # answer the commands waiting for a commit
        self.broker.stop_worker()
        if checkpoint and self.settings.checkpoint_path is not None and self.started:
            self.checkpoint()
        self.checkpoints.writer.wait()
        metrics.WORKER_UP.set(0)
        self.started = False

    def decoder(self) -> Callable[[Fixation], None]:
        """Fills a fixation's patch from its encoded image (or sets its problem), with the limits."""
        s = self.settings
        return partial(
            decode_fixation, max_pixels=s.max_pixels, size=s.input_size, max_patch_px=s.max_patch_px
        )

    @property
    def alive(self) -> bool:
        return self.started and (self._thread is None or self._thread.is_alive())

    # ------------------------------------------------------------------ checkpoints

    def restore(self) -> bool:
        """Load ``checkpoint_path`` if it exists (service/checkpointer.py); True if one was loaded."""
        return self.checkpoints.restore()

    def checkpoint(self, *, wait: bool = True) -> dict[str, Any] | None:
        """Checkpoint everything (service/checkpointer.py ``CheckpointDriver.checkpoint``)."""
        return self.checkpoints.checkpoint(wait=wait)

    def service_state(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint saves beside the learner (under the lock): each stream's record, the
        input offset, the deleted streams, and ``checkpoint`` (what is being written)."""
        return {
            "records": {s: r.to_dict() for s, r in self.records.items()},
            "checkpoint": checkpoint,
            "input_offset": self.offset.text,
            "journal": self.journal.to_dict(),
            "deleted": self.deleted.to_dict(),
        }

    def load_service_state(self, saved: dict[str, Any]) -> None:
        """Take back what :meth:`service_state` saved, the learner being restored already."""
        self.records = {sid: StreamRecord.from_dict(rec) for sid, rec in saved.get("records", {}).items()}
        self._saved_offset = saved.get("input_offset")
        self.journal.load(saved.get("journal", {}))
        self.deleted.load(saved.get("deleted", {}))
        for sid in self.learner.stream_ids():
            self.records.setdefault(sid, StreamRecord(sid))
        for sid in [s for s in self.records if s not in set(self.learner.stream_ids())]:
            del self.records[sid]
        self.last_checkpoint = saved.get("checkpoint")
        metrics.ACTIVE_STREAMS.set(len(self.records))

    # ------------------------------------------------------------------ gathering

    def _held_count(self) -> int:
        return self.batcher.held

    def _receive(self, timeout: float) -> Message | None:
        """The broker's next message; a fixation's Redis entry stays open until it is answered."""
        msg = self.broker.get(timeout)
        if isinstance(msg, Fixation):
            self.offset.opened(msg.entry_id)
        return msg

    # ------------------------------------------------------------------ ticks

    def _tick(self, batch: list[Fixation]) -> None:
        with self._lock:
            self.journal.before_tick(batch)  # records re-applied at their place after a restart
            accepted, replies = screen(self, batch)
            replies.extend(self._apply(accepted))
            self.journal.seen(batch)
        self.broker.reply(replies)
        self.offset.answered([fix.entry_id for fix in batch])  # (see the module docstring)
        self.journal.after_tick()

    def _apply(self, accepted: list[Accepted]) -> list[tuple[Message, dict[str, Any]]]:
        if not accepted:
            return []
        fixes = [a.fix for a in accepted]
        ids = [f.stream_id for f in fixes]
        start = time.perf_counter()
        try:
            out = self._learner_tick(fixes)
        except (FoveateError, RuntimeError) as exc:
            return self._failed_tick(accepted, exc)
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
                self.deleted.lift(fix.stream_id)
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
            patches = cast("list[np.ndarray]", [f.patch for f in fixes])  # decoded before the tick
            live.FEED.observe(ids, patches, steps=steps, errors=errors,
                              repeat_errors=repeats, seqs=[f.seq for f in fixes])  # fmt: skip
        except Exception:
            logger.warning("live page feed failed on a tick; the page may miss it", exc_info=True)
        metrics.FIXATIONS.inc(len(fixes))
        metrics.BATCH_SIZE.observe(len(fixes))
        if out.updated:
            metrics.UPDATES.inc()
        metrics.ACTIVE_STREAMS.set(len(self.records))
        return replies

    def _learner_tick(self, fixes: list[Fixation]) -> Any:
        """One learner tick on the fixations' patches (service/dist_worker.py ticks on features)."""
        patches: Any = [f.patch for f in fixes]
        if len({p.shape for p in patches}) == 1:
            patches = np.stack(patches)  # (B, P, P, 3) uint8: the learner takes it without resizing
        return self.learner.tick([f.stream_id for f in fixes], patches, reset=[f.reset for f in fixes])

    def _failed_tick(self, accepted: list[Accepted], exc: Exception) -> list[tuple[Message, dict[str, Any]]]:
        """The answers to a tick the learner refused: a bad fixation is found by applying each alone,
        so the others are still learned from (a distributed rank must not: service/dist_worker.py)."""
        fixes = [a.fix for a in accepted]
        if isinstance(exc, FoveateError):
            if len(fixes) == 1:
                metrics.REJECTED_MESSAGES.labels(reason=reject_reason(exc)).inc()
                return [(fixes[0], failure(exc))]
            return [pair for one in accepted for pair in self._apply([one])]
        # torch failures (out of memory, device lost): answer, keep running
        logger.error("learner tick failed on %d fixations", len(fixes), exc_info=exc)
        metrics.REJECTED_MESSAGES.labels(reason="internal").inc(len(fixes))
        return [(f, failure(WorkerError(f"the learner failed: {exc}"))) for f in fixes]

    # ------------------------------------------------------------------ commands

    def _command(self, ctl: Control) -> None:
        if ctl.command == "checkpoint" and self.settings.checkpoint_path is not None:
            self.checkpoints.after_commit(ctl)  # answered after the commit, the loop going on
            return
        try:
            if ctl.command in JOURNALED and self.journal.enabled:  # durable before applied
                payload = {"ok": True, **self.journal.command(ctl)}
            else:
                payload = {"ok": True, **self.execute(ctl.command, ctl.args)}
        except FoveateError as exc:
            metrics.REJECTED_MESSAGES.labels(reason=reject_reason(exc)).inc()
            payload = failure(exc)
        self.broker.reply([(ctl, payload)])

    def execute(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run one command's handler (service/commands.py) on the worker's state, on its thread."""
        handler = HANDLERS.get(cast(Command, command))
        if handler is None:  # a broken control entry arrives as "invalid", naming what it carried
            raise InputError(f"unknown worker command {args.get('command', command)!r}")
        if command in TAKE_THEIR_OWN_LOCK:
            return handler(self, args)
        with self._lock:
            return handler(self, args)

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
                               "queue_depth": depth, "service_rate": self.rate.per_second(),
                               "tick_s": self.rate.tick_seconds()})  # fmt: skip

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= 1.0:
            self._heartbeat()
        if now - self._last_diag >= self.settings.diagnostics_interval_s:
            self._last_diag = now
            self._export_diagnostics()
        if (
            self.settings.checkpoint_path is not None
            and now - self.checkpoints.last_taken >= self.settings.checkpoint_interval_s
        ):
            self.checkpoints.quietly("periodic", wait=False)  # written beside the loop
            self.checkpoints.last_taken = time.monotonic()

    def _export_diagnostics(self) -> None:
        diag = self.learner.diagnostics
        summary = diag.summary()
        z = diag.embeddings()  # (W, D)
        if z.shape[0]:
            summary["embedding_norm"] = float(z.norm(dim=-1).mean())
        metrics.set_diagnostics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
