"""The worker's checkpoints: when they are taken, what they hold, who waits for them, and the thread
that writes them.

:class:`CheckpointDriver` restores the checkpoint at start and takes one when asked, periodically and
at stop. The tick loop only takes the snapshot (``learner.checkpoint.take_snapshot``, milliseconds,
under the worker's lock): the weights, the stream states and the worker's own bookkeeping
(``Worker.service_state``: each stream's record, the input offset, the command journal's position,
the deleted streams). A :class:`Checkpointer` writes the files and commits the manifest beside the
loop, one write at a time; after the commit the journal's records up to the position it holds are
trimmed (service/journal.py).
A periodic checkpoint asked for while one is being written is skipped (coalesced: the next interval
takes it); an explicit one (``POST /v1/model/checkpoint``, the final one at stop) first waits for the
write in flight, then takes its own and waits for its commit. The ``checkpoint`` command waits in
the driver while the loop learns on: :meth:`CheckpointDriver.settle`, called from the loop, starts
its checkpoint and answers it once it has committed. (A reset or delete over Redis no longer waits
for a checkpoint: the command journal makes it durable.)

A write nobody waits for runs at a lower CPU priority (niceness ``BACKGROUND_NICE``, this thread
only, on Linux): on two shared cores the writer otherwise slowed every tick during the write 2-3x;
niced, ticks ran as fast as without a checkpoint and the write took longer (docs/results.md).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from learner.errors import CheckpointError, ConfigError, FoveateError
from service import metrics
from service.messages import Control
from service.replies import failure

if TYPE_CHECKING:
    from service.worker import Worker

logger = logging.getLogger(__name__)

BACKGROUND_NICE = 10


class WriteJob:
    """One checkpoint write: its result, or the exception that stopped it, once ``done``."""

    def __init__(self, write: Callable[[], dict[str, Any]], nice: int = 0) -> None:
        self._write = write
        self._nice = nice
        self.done = threading.Event()
        self.info: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.waited = False  # someone will see the error: no need to log it here

    def run(self) -> None:
        if self._nice and sys.platform == "linux":  # a thread's own priority: Linux only
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
        try:
            self.info = self._write()
        except BaseException as exc:  # handed to whoever waits on the job (result); logged otherwise
            self.error = exc
            if not self.waited:
                logger.error("checkpoint write failed: %s", exc, exc_info=exc)
        finally:
            self.done.set()

    def result(self) -> dict[str, Any]:
        """Wait for the commit; raise what the write raised."""
        self.waited = True
        self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.info is not None
        return self.info


class Checkpointer:
    """Runs checkpoint writes in a thread, one at a time.

    Examples
    --------
    >>> writer = Checkpointer()
    >>> writer.submit(lambda: {"bytes": 1}).result()
    {'bytes': 1}
    >>> writer.busy
    False
    """

    def __init__(self) -> None:
        self._job: WriteJob | None = None
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return self._job is not None and not self._job.done.is_set()

    def wait(self) -> None:
        """Until the write in flight, if any, has committed or failed (its error is not raised here)."""
        if self._thread is not None:
            self._thread.join()

    def submit(self, write: Callable[[], dict[str, Any]], *, background: bool = False) -> WriteJob:
        """Start ``write`` in a thread; the caller makes sure no write is in flight (``wait``).
        ``background``: nobody waits for it, it yields the CPU to the tick loop."""
        if self.busy:
            raise RuntimeError("a checkpoint is being written already")
        job = WriteJob(write, BACKGROUND_NICE if background else 0)
        self._job = job
        self._thread = threading.Thread(target=job.run, name="foveate-checkpoint", daemon=True)
        self._thread.start()
        return job


#: Checkpoint commands waiting for a commit.
Waiting = list[Control]


def committed(
    worker: Worker, info: dict[str, Any], written: dict[str, Any], journal_through: str | None
) -> dict[str, Any]:
    """After a commit (in the writer's thread): its figures into ``info`` and the metrics, ``info``
    as the worker's last checkpoint, and the command journal trimmed to the snapshot's position (the
    commit holds the effect of the commands journaled up to there). Returns ``info``."""
    info.update(written)
    info["seconds"] = written["write_seconds"]
    metrics.CHECKPOINT_SECONDS.observe(written["write_seconds"])
    metrics.CHECKPOINT_BYTES.set(written["bytes"])
    metrics.CHECKPOINT_WRITTEN_BYTES.set(written["bytes_written"])
    metrics.CHECKPOINTS.inc()
    metrics.LAST_CHECKPOINT.set(info["written_at"])
    worker.last_checkpoint = info
    if journal_through is not None:
        worker.broker.journal_trim(journal_through)
    return info


class CheckpointDriver:
    """Restores and takes the worker's checkpoints, and answers the checkpoint commands at their commit.

    Parameters
    ----------
    worker
        Whose learner and bookkeeping (``service_state``, ``load_service_state``) are saved and
        restored, at its ``settings.checkpoint_path``, and whose broker carries the answers.
    lock
        The worker's tick lock: the snapshot is taken under it, the only pause of learning.
    """

    def __init__(self, worker: Worker, lock: threading.Lock) -> None:
        self.worker = worker
        self._lock = lock
        self.writer = Checkpointer()  # writes the snapshots beside the loop
        # commands waiting for the next checkpoint, and the write in flight with those waiting for it
        self._waiting: Waiting = []
        self._committing: tuple[WriteJob, Waiting] | None = None
        self.last_taken = time.monotonic()

    def restore(self) -> bool:
        """Load ``checkpoint_path`` if it exists; ``ArchitectureMismatch``, ``CheckpointError`` propagate."""
        from learner.checkpoint import has_checkpoint, load_checkpoint, read_checkpoint

        path = self.worker.settings.checkpoint_path
        if path is None or not has_checkpoint(path):
            logger.info("no checkpoint at %s: starting fresh", path)
            return False
        ranks = read_checkpoint(path).get("ranks")
        if ranks:  # its offsets are of the shards foveate:fixations:r, which this worker does not read
            raise CheckpointError(
                f"the checkpoint at {path} was written by a distributed worker of {ranks} ranks: restore "
                "it with `foveate worker --distributed` (any number of ranks >= 2), or point "
                "FOVEATE_CHECKPOINT_PATH elsewhere to start this single worker fresh"
            )
        extra = load_checkpoint(path, self.worker.learner)
        self.worker.load_service_state(extra.get("service", {}))
        return True

    def checkpoint(self, *, wait: bool = True) -> dict[str, Any] | None:
        """Checkpoint everything to ``checkpoint_path``: learning pauses for the snapshot only.

        ``wait``: return what was written once the manifest is committed (after the write in
        flight, if any). Otherwise (the periodic checkpoint) return at once, None; and skip it when a
        write is in flight already (learner/checkpoint.py).
        """
        if self.worker.settings.checkpoint_path is None:
            raise ConfigError("checkpoints are disabled: set FOVEATE_CHECKPOINT_PATH")
        if not wait and self.writer.busy:
            return None
        self.writer.wait()
        job = self._start(background=not wait)
        return job.result() if wait else None

    def quietly(self, when: str, *, wait: bool = True) -> None:
        """:meth:`checkpoint`, logging a failure instead of raising it; nothing without a path."""
        if self.worker.settings.checkpoint_path is None:
            return
        try:
            self.checkpoint(wait=wait)
        except (FoveateError, OSError) as exc:  # a full disk must not stop learning; retry next interval
            logger.error("checkpoint %s failed: %s", when, exc)

    def after_commit(self, ctl: Control) -> None:
        """Answer ``ctl`` with the checkpoint's info once the next checkpoint commits."""
        self._waiting.append(ctl)

    @property
    def pending(self) -> bool:
        """Whether a command waits for a commit."""
        return self._committing is not None or bool(self._waiting)

    def _start(self, *, background: bool) -> WriteJob:
        """Take the snapshot (under the lock: the only pause of learning) and start writing it."""
        worker = self.worker
        path = worker.settings.checkpoint_path
        assert path is not None
        from learner.checkpoint import take_snapshot, write_snapshot

        with self._lock:
            start, written_at = time.perf_counter(), time.time()
            info: dict[str, Any] = {"path": str(path), "written_at": written_at,
                                    "updates_applied": worker.learner.updates_applied,
                                    "streams": len(worker.records)}  # fmt: skip
            service = worker.service_state(dict(info))
            journal_through = service["journal"]["through"]
            snap = take_snapshot(path, worker.learner, {"service": service})
            info["stall_seconds"] = time.perf_counter() - start
        metrics.CHECKPOINT_STALL_SECONDS.observe(info["stall_seconds"])
        self.last_taken = time.monotonic()

        def write() -> dict[str, Any]:  # in the writer's thread
            return committed(worker, info, write_snapshot(snap, worker.checkpoint_stage), journal_through)

        return self.writer.submit(write, background=background)

    def settle(self) -> None:
        """Answer the commands that waited for a commit, and start the checkpoint the next ones wait
        for: the loop goes on learning meanwhile (called from the loop, and at stop)."""
        reply = self.worker.broker.reply
        if self._committing is not None:
            job, waiting = self._committing
            if not job.done.is_set():
                return
            self._committing = None
            reply([(ctl, self._committed(job)) for ctl in waiting])
        if self._waiting and not self.writer.busy:
            waiting, self._waiting = self._waiting, []
            try:
                job = self._start(background=False)
            except (FoveateError, OSError) as exc:
                failed = WriteJob(lambda: {})
                failed.error, failed.waited = exc, True
                failed.done.set()
                logger.error("checkpoint for %d waiting command(s) failed: %s", len(waiting), exc)
                reply([(ctl, self._committed(failed)) for ctl in waiting])
                return
            job.waited = True  # its error goes into the replies
            self._committing = (job, waiting)

    def drain(self) -> None:
        """Until no command waits for a commit (at stop, the loop having ended)."""
        while self.pending:
            self.writer.wait()
            self.settle()

    @staticmethod
    def _committed(job: WriteJob) -> dict[str, Any]:
        """The reply of a checkpoint command that waited for ``job``: what was written, or the error."""
        if job.error is not None:
            err = job.error
            return failure(err if isinstance(err, Exception) else RuntimeError(str(err)))
        return {"ok": True, "checkpoint": job.info}
