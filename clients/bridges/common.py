"""What every bridge shares: where fixations go (a :class:`Sink`) and how they get there without loss.

A bridge turns eye-tracker data into :class:`OutgoingFixation` s and hands them to a
:class:`FixationPoster`, which

- numbers them per stream (``seq`` 0, 1, 2, ... in the order detected; the first of a run carries
  ``reset=True`` so the server starts a new sequence);
- keeps them in a bounded backlog and posts them in order from a background thread, so reading the
  tracker never waits for the network;
- on a failure that may pass (server down or restarting, 429, 503, 504, a dropped connection)
  keeps the fixation at the head of the backlog and retries with exponential backoff: once the
  server is back it resumes at the first fixation not yet acknowledged, nothing skipped. Delivery is
  at-least-once: a request that timed out after the server applied it is sent again;
- on a rejection (4xx: the fixation itself is bad) counts it and moves on;
- when the backlog is full (a long outage) drops the *oldest* waiting fixation and counts it: the
  newest data matter most to an online learner, and the gap shows in the server's ``seq``;
- reports what it did (:class:`BridgeStats`): in the log every ``report_every_s`` seconds and at
  the end, and as JSON in ``report_path`` (rewritten atomically each time).

The sink is a callable, so tests record instead of posting; :class:`SdkSink` adapts the SDK's
:class:`~clients.sdk.FoveateClient` and sorts its exceptions into :class:`SinkUnavailable`
(retry) and :class:`SinkRejected` (skip). The sink side lives in ``clients/bridges/sink.py``; its
names are re-exported here.

Examples
--------
>>> import numpy as np
>>> sent = []
>>> def sink(stream_id, fix):
...     sent.append((stream_id, fix.seq, fix.reset))
...     return PostResult(step=fix.seq + 1, error=None)
>>> poster = FixationPoster(sink, "rig1")
>>> poster.submit(t=0.0, duration_ms=250.0, x=10.0, y=20.0, patch=np.zeros((8, 8, 3), np.uint8))
0
>>> poster.close(drain_timeout_s=5.0).sent, sent
(1, [('rig1', 0, True)])
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clients.bridges.sink import (
    OutgoingFixation,
    PosterClosed,
    PostResult,
    SdkSink,
    Sink,
    SinkError,
    SinkRejected,
    SinkUnavailable,
)
from learner.errors import ConfigError

__all__ = [
    "BridgeStats",
    "FixationPoster",
    "OutgoingFixation",
    "PostResult",
    "PosterClosed",
    "SdkSink",
    "Sink",
    "SinkError",
    "SinkRejected",
    "SinkUnavailable",
]

log = logging.getLogger(__name__)


@dataclass
class BridgeStats:
    """What a bridge did; ``as_dict`` is the JSON report.

    ``detected``: fixations handed to the poster (= sequence numbers assigned); ``sent``:
    acknowledged by the server; ``rejected``: refused for good; ``dropped``: lost to a full backlog;
    ``backlog``: waiting now; ``skipped``: found but not postable (no frame yet, gaze off the frame);
    ``failed_attempts``: posts that failed and were retried; ``outages``: times the server went from
    answering to not; ``source_restarts``: times the tracker's stream was lost and found again.
    """

    bridge: str
    stream_id: str
    server: str | None = None
    started_at: float = field(default_factory=time.time)
    elapsed_s: float = 0.0
    detected: int = 0
    sent: int = 0
    rejected: int = 0
    dropped: int = 0
    backlog: int = 0
    skipped: int = 0
    failed_attempts: int = 0
    outages: int = 0
    source_restarts: int = 0
    last_seq_sent: int | None = None
    last_step: int | None = None
    last_error: float | None = None
    last_failure: str | None = None
    skip_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON types (NaN errors become null)."""
        data = dataclasses.asdict(self)
        if data["last_error"] is not None and not math.isfinite(data["last_error"]):
            data["last_error"] = None
        return data

    def summary(self) -> str:
        """One line for the log."""
        err = "-" if self.last_error is None else f"{self.last_error:.3f}"
        return (
            f"{self.bridge} -> {self.stream_id}: {self.detected} detected, {self.sent} sent "
            f"(last seq {self.last_seq_sent}, step {self.last_step}, error {err}), backlog {self.backlog}, "
            f"{self.rejected} rejected, {self.dropped} dropped, {self.skipped} skipped, "
            f"{self.failed_attempts} failed attempts, {self.source_restarts} source restarts"
        )


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that a reader never sees half a file (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class FixationPoster:
    """Numbers fixations and posts them in order from a background thread; see the module docstring.

    Parameters
    ----------
    sink
        Where fixations go.
    stream_id
        The server-side stream.
    bridge
        Name in reports (``"lsl"``, ``"pupil"``).
    max_backlog
        Most fixations kept waiting; beyond it the oldest waiting one is dropped.
    backoff_s, max_backoff_s
        First and longest wait between attempts while the server is unavailable (doubling).
    first_seq
        Sequence number of the first fixation.
    reset_first
        Send ``reset=True`` with the first fixation (a new sequence on the server).
    report_every_s, report_path
        Log a summary this often (0: only at the end); write the JSON report there.
    server
        Shown in the report.
    """

    def __init__(
        self,
        sink: Sink,
        stream_id: str,
        *,
        bridge: str = "bridge",
        max_backlog: int = 1000,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        first_seq: int = 0,
        reset_first: bool = True,
        report_every_s: float = 10.0,
        report_path: Path | None = None,
        server: str | None = None,
    ) -> None:
        if max_backlog < 1:
            raise ConfigError(f"max_backlog must be at least 1, got {max_backlog}")
        self._sink = sink
        self.stream_id = stream_id
        self.max_backlog = int(max_backlog)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.report_every_s = float(report_every_s)
        self.report_path = report_path
        self._next_seq = int(first_seq)
        self._reset_next = bool(reset_first)
        self._stats = BridgeStats(bridge=bridge, stream_id=stream_id, server=server)
        self._backlog: deque[OutgoingFixation] = deque()
        self._cond = threading.Condition()
        self._in_flight = False
        self._closing = False
        self._drain_deadline = math.inf
        self._failure: BaseException | None = None
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"{bridge}-poster", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the bridge's side

    def submit(self, *, t: float, duration_ms: float, x: float, y: float, patch: np.ndarray) -> int:
        """Queue one fixation; return its sequence number. Raises what killed the sender thread."""
        with self._cond:
            self._raise_if_failed()
            if self._closing:
                raise PosterClosed("FixationPoster.submit() after close()")
            fix = OutgoingFixation(self._next_seq, float(t), float(duration_ms), float(x), float(y), patch,
                                   reset=self._reset_next)  # fmt: skip
            self._next_seq += 1
            self._reset_next = False
            if len(self._backlog) >= self.max_backlog:
                # Never the one being sent: its answer must find it at the head.
                victim = 1 if self._in_flight and len(self._backlog) > 1 else 0
                dropped = self._backlog[victim]
                del self._backlog[victim]
                self._stats.dropped += 1
                log.warning("backlog full (%d): dropped fixation seq %d", self.max_backlog, dropped.seq)
            self._backlog.append(fix)
            self._stats.detected += 1
            self._cond.notify_all()
            return fix.seq

    def skip(self, reason: str) -> None:
        """Count a fixation that was found but could not be posted (say why, in a few words)."""
        with self._cond:
            self._stats.skipped += 1
            self._stats.skip_reasons[reason] = self._stats.skip_reasons.get(reason, 0) + 1

    def source_restarted(self) -> None:
        """Count a lost-and-found tracker stream."""
        with self._cond:
            self._stats.source_restarts += 1

    @property
    def stats(self) -> BridgeStats:
        """A snapshot of the counters."""
        with self._cond:
            return self._snapshot()

    def close(self, drain_timeout_s: float = 10.0) -> BridgeStats:
        """Stop taking fixations, post what is waiting (for at most ``drain_timeout_s``), report.

        Returns the final stats; ``stats.backlog`` is what could not be posted in time.
        """
        with self._cond:
            self._closing = True
            self._drain_deadline = time.monotonic() + max(0.0, drain_timeout_s)
            self._cond.notify_all()
        self._thread.join(timeout=max(0.0, drain_timeout_s) + 35.0)  # + one request's timeout
        with self._cond:
            stats = self._snapshot()
        self._report(stats, final=True)
        with self._cond:
            self._raise_if_failed()
        return stats

    # ---------------------------------------------------------------- the sender thread

    def _snapshot(self) -> BridgeStats:
        self._stats.backlog = len(self._backlog)
        self._stats.elapsed_s = round(time.monotonic() - self._started, 3)
        return dataclasses.replace(self._stats, skip_reasons=dict(self._stats.skip_reasons))

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise SinkError(f"the poster thread stopped: {self._failure!r}") from self._failure

    def _report(self, stats: BridgeStats, *, final: bool = False) -> None:
        log.info("%s%s", "final: " if final else "", stats.summary())
        if self.report_path is not None:
            write_json_atomic(self.report_path, stats.as_dict())

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported to the bridge's thread by submit() and close()
            with self._cond:
                self._failure = exc
            log.exception("the poster thread stopped")

    def _next_item(self, next_report: float) -> tuple[OutgoingFixation | None, float]:
        """Wait for a fixation to send; None when closing and done. Reports on the way."""
        with self._cond:
            while True:
                now = time.monotonic()
                if now >= next_report:
                    self._report(self._snapshot())
                    next_report = now + self.report_every_s
                if self._closing and (not self._backlog or now >= self._drain_deadline):
                    return None, next_report
                if self._backlog:
                    self._in_flight = True
                    return self._backlog[0], next_report
                self._cond.wait(timeout=min(0.5, max(0.01, next_report - now)))

    def _loop(self) -> None:
        delay = self.backoff_s
        attempts = 0
        down = False
        next_report = time.monotonic() + self.report_every_s if self.report_every_s > 0 else math.inf
        while True:
            fix, next_report = self._next_item(next_report)
            if fix is None:
                return
            try:
                result = self._sink(self.stream_id, fix)
            except SinkUnavailable as exc:
                attempts += 1
                with self._cond:
                    self._in_flight = False
                    self._stats.failed_attempts += 1
                    self._stats.last_failure = str(exc)
                    if not down:
                        self._stats.outages += 1
                        log.warning("server unavailable (%s); retrying, keeping up to %d fixations", exc,
                                    self.max_backlog)  # fmt: skip
                    down = True
                    if exc.retry_limit is None or attempts <= exc.retry_limit:
                        # Wait, but wake for close(): the drain deadline still applies.
                        deadline = time.monotonic() + delay
                        while time.monotonic() < min(deadline, self._drain_deadline):
                            self._cond.wait(
                                timeout=max(0.0, min(deadline, self._drain_deadline) - time.monotonic())
                            )
                        delay = min(self.max_backoff_s, delay * 2)
                        continue
                    self._done(fix, rejected=True)
                    log.error("gave up on fixation seq %d after %d attempts: %s", fix.seq, attempts, exc)
            except SinkRejected as exc:
                with self._cond:
                    self._in_flight = False
                    self._stats.last_failure = str(exc)
                    self._done(fix, rejected=True)
                log.warning("server rejected fixation seq %d: %s", fix.seq, exc)
            else:
                with self._cond:
                    self._in_flight = False
                    self._done(fix, rejected=False)
                    self._stats.last_seq_sent, self._stats.last_step = fix.seq, result.step
                    self._stats.last_error = result.error
                if down:
                    log.info("server back: resumed at seq %d", fix.seq)
                down = False
            attempts = 0
            delay = self.backoff_s

    def _done(self, fix: OutgoingFixation, *, rejected: bool) -> None:
        """Remove the head (it is ``fix``: only the sender removes heads) and count it; lock held."""
        assert self._backlog and self._backlog[0] is fix
        self._backlog.popleft()
        if rejected:
            self._stats.rejected += 1
        else:
            self._stats.sent += 1
        self._cond.notify_all()
