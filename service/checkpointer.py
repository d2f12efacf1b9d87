"""The worker's checkpoint writer: one background thread per write, at most one write in flight.

The tick loop only takes the snapshot (``learner.checkpoint.take_snapshot``, milliseconds) and hands
it here; the files are written and the manifest committed beside the loop. A periodic checkpoint
asked for while one is being written is skipped (coalesced: the next interval takes it); an explicit
one (``POST /v1/model/checkpoint``, a reset or delete over Redis, the final one at stop) first waits
for the write in flight, then takes its own and waits for its commit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class WriteJob:
    """One checkpoint write: its result, or the exception that stopped it, once ``done``."""

    def __init__(self, write: Callable[[], dict[str, Any]]) -> None:
        self._write = write
        self.done = threading.Event()
        self.info: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.waited = False  # someone will see the error: no need to log it here

    def run(self) -> None:
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

    def submit(self, write: Callable[[], dict[str, Any]]) -> WriteJob:
        """Start ``write`` in a thread; the caller makes sure no write is in flight (``wait``)."""
        if self.busy:
            raise RuntimeError("a checkpoint is being written already")
        job = WriteJob(write)
        self._job = job
        self._thread = threading.Thread(target=job.run, name="foveate-checkpoint", daemon=True)
        self._thread.start()
        return job
