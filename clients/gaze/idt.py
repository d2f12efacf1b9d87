"""I-DT, dispersion-threshold identification, online (the package docstring describes it)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from clients.gaze.base import (
    _EPS_S,
    DEFAULT_MAX_GAP_MS,
    DEFAULT_MERGE_ANGLE_DEG,
    DEFAULT_MERGE_GAP_MS,
    DEFAULT_MIN_CONFIDENCE,
    DetectedFixation,
    FixationDetector,
    _positive,
    _Sample,
)


class IDTDetector(FixationDetector):
    """Dispersion-threshold identification (I-DT), online; see the module docstring.

    Parameters
    ----------
    px_per_deg
        Pixels per degree of visual angle.
    dispersion_threshold
        Largest dispersion ``(max x − min x) + (max y − min y)`` of a fixation, in degrees (default 1.0).
    min_duration_ms
        Shortest fixation, the span of the initial window (default 100).
    min_confidence, max_gap_ms, merge_gap_ms, merge_angle_deg
        See :class:`FixationDetector`.

    Examples
    --------
    >>> det = IDTDetector(px_per_deg=40.0)
    >>> det.push(0.0, 10.0, 10.0)
    []
    """

    def __init__(
        self,
        px_per_deg: float,
        *,
        dispersion_threshold: float = 1.0,
        min_duration_ms: float = 100.0,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
        max_gap_ms: float = DEFAULT_MAX_GAP_MS,
        merge_gap_ms: float = DEFAULT_MERGE_GAP_MS,
        merge_angle_deg: float = DEFAULT_MERGE_ANGLE_DEG,
    ) -> None:
        super().__init__(
            px_per_deg, min_duration_ms=min_duration_ms, min_confidence=min_confidence, max_gap_ms=max_gap_ms,
            merge_gap_ms=merge_gap_ms, merge_angle_deg=merge_angle_deg,
        )  # fmt: skip
        self.dispersion_threshold = _positive("dispersion_threshold", dispersion_threshold)
        self._limit_px = self.dispersion_threshold * self.px_per_deg
        # The window; while a fixation is open it holds all of the fixation's samples.
        self._win: deque[_Sample] = deque()
        self._box: tuple[float, float, float, float] | None = None  # (min x, max x, min y, max y) when open
        self._sx = self._sy = 0.0  # sums of the open fixation's x and y

    def _dispersion(self, box: tuple[float, float, float, float]) -> float:
        return box[1] - box[0] + box[3] - box[2]

    @staticmethod
    def _bounds(samples: Iterable[_Sample]) -> tuple[float, float, float, float]:
        xs = [s[1] for s in samples]
        ys = [s[2] for s in samples]
        return min(xs), max(xs), min(ys), max(ys)

    def _open_if_compact(self) -> None:
        """Drop leading samples until the window covering the minimum duration is compact enough."""
        win = self._win
        while len(win) >= 2 and win[-1][0] - win[0][0] + _EPS_S >= self.min_duration_s:
            box = self._bounds(win)
            if self._dispersion(box) <= self._limit_px:
                self._box = box
                self._sx, self._sy = sum(s[1] for s in win), sum(s[2] for s in win)
                return
            win.popleft()

    def _trim_saccade_tail(self, x: float, y: float) -> bool:
        """Make room for (x, y) by dropping leading samples that are the end of the previous saccade.

        The first window may begin with the slow last samples of the saccade that led to the
        fixation; they inflate the box, so that later sensor noise alone would break the fixation.
        Leading samples farther than half the threshold from the centroid (city-block, like D) are
        such samples; they are dropped when that brings (x, y) within the threshold.
        """
        win = self._win
        cx, cy = self._sx / len(win), self._sy / len(win)
        k = 0
        while k < len(win) - 1 and abs(win[k][1] - cx) + abs(win[k][2] - cy) > 0.5 * self._limit_px:
            k += 1
        if k == 0:
            return False
        rest = [*list(win)[k:], (0.0, x, y)]
        box = self._bounds(rest)
        if self._dispersion(box) > self._limit_px:
            return False
        for _ in range(k):
            _, xd, yd = win.popleft()
            self._sx -= xd
            self._sy -= yd
        self._box = box
        return True

    def _pending(self, now: float) -> tuple[float, tuple[float, float] | None]:
        if not self._win:
            return now, None
        centre = (self._sx / len(self._win), self._sy / len(self._win)) if self._box is not None else None
        return self._win[0][0], centre

    def _add(self, t: float, x: float, y: float) -> list[DetectedFixation]:
        if self._box is None:
            self._win.append((t, x, y))
            self._open_if_compact()
            return []
        lo_x, hi_x, lo_y, hi_y = self._box
        box = (min(lo_x, x), max(hi_x, x), min(lo_y, y), max(hi_y, y))
        if self._dispersion(box) <= self._limit_px or self._trim_saccade_tail(x, y):
            if self._dispersion(box) <= self._limit_px:
                self._box = box
            self._win.append((t, x, y))
            self._sx += x
            self._sy += y
            return []
        # This sample breaks the fixation and starts the next window.
        ended = self._end_segment()
        self._win.append((t, x, y))
        return ended

    def _end_segment(self) -> list[DetectedFixation]:
        found: list[DetectedFixation] = []
        win = self._win
        if self._box is not None and win[-1][0] - win[0][0] + _EPS_S >= self.min_duration_s:
            n = len(win)
            found.append(DetectedFixation(win[0][0], win[-1][0], self._sx / n, self._sy / n, n))
        self._box = None
        self._sx = self._sy = 0.0
        win.clear()
        return found
