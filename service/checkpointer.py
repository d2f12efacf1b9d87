"""The worker's checkpoint writer: one background thread per write, at most one write in flight.

The tick loop only takes the snapshot (``learner.checkpoint.take_snapshot``, milliseconds) and hands
it here; the files are written and the manifest committed beside the loop. A periodic checkpoint
asked for while one is being written is skipped (coalesced: the next interval takes it); an explicit
one (``POST /v1/model/checkpoint``, a reset or delete over Redis, the final one at stop) first waits
for the write in flight, then takes its own and waits for its commit.

A write nobody waits for runs at a lower CPU priority (niceness ``BACKGROUND_NICE``, this thread
only, on Linux): on two shared cores the writer otherwise slowed every tick during the write 2-3x;
niced, ticks ran as fast as without a checkpoint and the write took longer (docs/results.md).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

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
