"""I-VT, velocity-threshold identification, online (the package docstring describes it)."""

from __future__ import annotations

import math
from collections import deque

from clients.gaze.base import (
    _EPS_S,
    DEFAULT_MAX_GAP_MS,
    DEFAULT_MERGE_ANGLE_DEG,
    DEFAULT_MERGE_GAP_MS,
    DEFAULT_MIN_CONFIDENCE,
    DetectedFixation,
    FixationDetector,
    _Centroid,
    _positive,
    _Sample,
)
from learner.errors import ConfigError


class IVTDetector(FixationDetector):
    """Velocity-threshold identification (I-VT), online; see the module docstring.

    Parameters
    ----------
    px_per_deg
        Pixels per degree of visual angle.
    velocity_threshold
        Samples slower than this (°/s) are fixation samples (default 30).
    min_duration_ms
        Shortest fixation reported (default 60).
    velocity_samples
        Half-width *h* of the centred velocity window, in samples (default 1). A sample is
        classified once *h* later samples have arrived.
    min_confidence, max_gap_ms, merge_gap_ms, merge_angle_deg
        See :class:`FixationDetector`.

    Examples
    --------
    >>> det = IVTDetector(px_per_deg=40.0, velocity_threshold=30.0)
    >>> det.push(0.0, 10.0, 10.0)
    []
    """

    def __init__(
        self,
        px_per_deg: float,
        *,
        velocity_threshold: float = 30.0,
        min_duration_ms: float = 60.0,
        velocity_samples: int = 1,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
        max_gap_ms: float = DEFAULT_MAX_GAP_MS,
        merge_gap_ms: float = DEFAULT_MERGE_GAP_MS,
        merge_angle_deg: float = DEFAULT_MERGE_ANGLE_DEG,
    ) -> None:
        super().__init__(
            px_per_deg, min_duration_ms=min_duration_ms, min_confidence=min_confidence, max_gap_ms=max_gap_ms,
            merge_gap_ms=merge_gap_ms, merge_angle_deg=merge_angle_deg,
        )  # fmt: skip
        self.velocity_threshold = _positive("velocity_threshold", velocity_threshold)
        if int(velocity_samples) != velocity_samples or velocity_samples < 1:
            raise ConfigError(f"velocity_samples must be a positive integer, got {velocity_samples}")
        self.h = int(velocity_samples)
        # The segment's samples from index `_base` on; samples before `_next - h` are no longer needed.
        self._buf: deque[_Sample] = deque()
        self._base = 0
        self._count = 0  # samples in the segment so far
        self._next = 0  # index of the first sample not yet classified
        self._run: _Centroid | None = None

    def _velocity(self, i: int, last: int) -> float:
        """Speed (°/s) of segment sample ``i``, using samples up to index ``last``."""
        dx = dy = dt = 0.0
        for k in range(1, self.h + 1):
            ta, xa, ya = self._buf[min(i + k, last) - self._base]
            tb, xb, yb = self._buf[max(i - k, 0) - self._base]
            dx, dy, dt = dx + xa - xb, dy + ya - yb, dt + ta - tb
        if dt <= 0.0:  # a one-sample segment: no velocity, never a fixation
            return math.inf
        return math.hypot(dx, dy) / self.px_per_deg / dt

    def _classify(self, i: int, last: int) -> list[DetectedFixation]:
        t, x, y = self._buf[i - self._base]
        if self._velocity(i, last) < self.velocity_threshold:
            if self._run is None:
                self._run = _Centroid(t, x, y)
            else:
                self._run.add(t, x, y)
            return []
        return self._close_run()

    def _close_run(self) -> list[DetectedFixation]:
        run, self._run = self._run, None
        found = run.result(self.min_duration_s) if run is not None else None
        return [found] if found is not None else []

    def _pending(self, now: float) -> tuple[float, tuple[float, float] | None]:
        run = self._run
        if run is not None:
            confirmed = run.t_last - run.onset + _EPS_S >= self.min_duration_s
            return run.onset, (run.sx / run.n, run.sy / run.n) if confirmed else None
        return (self._buf[self._next - self._base][0] if self._next < self._count else now), None

    def _add(self, t: float, x: float, y: float) -> list[DetectedFixation]:
        self._buf.append((t, x, y))
        self._count += 1
        ended: list[DetectedFixation] = []
        last = self._count - 1
        while self._next + self.h <= last:  # its full window has arrived
            ended += self._classify(self._next, last)
            self._next += 1
        while self._base < self._next - self.h:
            self._buf.popleft()
            self._base += 1
        return ended

    def _end_segment(self) -> list[DetectedFixation]:
        ended: list[DetectedFixation] = []
        last = self._count - 1
        while self._next <= last:  # the tail, with one-sided windows
            ended += self._classify(self._next, last)
            self._next += 1
        ended += self._close_run()
        self._buf.clear()
        self._base = self._count = self._next = 0
        return ended
