"""Fixation detection from raw gaze samples, online: I-VT and I-DT.

Eye trackers stream raw gaze samples (a time stamp, a gaze point in pixels, often a confidence);
foveate learns from *fixations*. The two classic detectors of Salvucci & Goldberg (2000),
"Identifying fixations and saccades in eye-tracking protocols" (ETRA '00), are implemented here so
that they run sample by sample: :meth:`FixationDetector.push` returns the fixations that a sample
ended, :meth:`FixationDetector.flush` the one still open.

I-VT (velocity threshold)
    Every sample gets a velocity; samples slower than the threshold are fixation samples and a run
    of consecutive fixation samples is one fixation (centroid = mean position). The velocity of
    sample *i* is a centred difference over ``velocity_samples`` = *h* samples on each side,
    ``|Σₖ (p[i+k] − p[i−k])| / Σₖ (t[i+k] − t[i−k])`` for k = 1..h, in degrees per second: h = 1
    (the default) is the plain central difference, h = 2 the five-point velocity of Engbert & Kliegl
    (2003), for noisier or faster trackers; a larger h blurs the fixation edges by about h − 1
    samples. Near a gap or the end of the data the window is cut short (one-sided). A fixation is
    only reported when it lasts at least ``min_duration_ms``. Defaults: 30 °/s and 60 ms, those of
    Tobii's I-VT fixation filter (Olsen, 2012).

I-DT (dispersion threshold)
    A window covering ``min_duration_ms`` is a fixation when its dispersion
    ``D = [max(x) − min(x)] + [max(y) − min(y)]`` (in degrees) is at most the threshold; it then
    grows sample by sample until D would exceed the threshold, and the fixation is the window
    without the sample that broke it. A window that is too dispersed drops its first sample.
    Salvucci & Goldberg suggest a duration threshold of 100–200 ms and a dispersion of about
    0.5–1° of visual angle; the defaults are 1.0° and 100 ms. One addition: the first window can
    catch the slow end of the saccade that led to the fixation, which inflates the box so that
    later noise breaks it; leading samples farther than half the threshold from the centroid are
    dropped when that is what keeps the next sample out.

Both detectors
    - work in degrees of visual angle: pixels are divided by ``px_per_deg``;
    - drop samples whose confidence is below ``min_confidence`` (default 0.6) or whose x or y is
      NaN (trackers send NaN during blinks);
    - end a fixation when valid samples stop for more than ``max_gap_ms`` (default 100 ms: longer
      than tracking jitter, shorter than a blink of ~100–400 ms), so a blink splits a fixation;
    - merge adjacent fixations less than ``merge_gap_ms`` apart in time (default 75 ms) and
      ``merge_angle_deg`` apart in space (default 0.5°), as Tobii's filter does (Olsen, 2012): noise
      can briefly cross a threshold inside one fixation (with I-DT, typically when the first window
      caught the slow end of the saccade), and the two halves are one fixation. A fixation is
      therefore reported once no later one can merge with it: up to about ``merge_gap_ms`` plus
      ``min_duration_ms`` after it ends. ``merge_gap_ms=0`` turns merging off for the lowest latency;
    - treat a time stamp that goes backwards as a new recording (a restarted source): the open
      fixation is ended, nothing is merged across the jump. Repeated time stamps are dropped.

A fixation's ``onset`` and ``offset`` are the time stamps of its first and last samples, so its
duration is ``offset − onset`` (one sample period shorter than "number of samples × period").

Examples
--------
>>> det = IVTDetector(px_per_deg=30.0)
>>> found = []
>>> for i in range(100):                      # 400 ms at 250 Hz: still, then a jump of 10 deg
...     x = 100.0 if i < 50 else 400.0
...     found += det.push(i * 0.004, x, 200.0)
>>> found += det.flush()
>>> [(round(f.x), round(f.duration_ms)) for f in found]
[(100, 192), (400, 192)]
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from learner.errors import ConfigError, InputError

__all__ = [
    "DEFAULT_MAX_GAP_MS",
    "DEFAULT_MERGE_ANGLE_DEG",
    "DEFAULT_MERGE_GAP_MS",
    "DEFAULT_MIN_CONFIDENCE",
    "DetectedFixation",
    "FixationDetector",
    "IDTDetector",
    "IVTDetector",
    "detect_all",
    "make_detector",
]

log = logging.getLogger(__name__)

DEFAULT_MIN_CONFIDENCE = 0.6
DEFAULT_MAX_GAP_MS = 100.0
DEFAULT_MERGE_GAP_MS = 75.0
DEFAULT_MERGE_ANGLE_DEG = 0.5
_EPS_S = 1e-9  # slack on duration comparisons: time stamps are sums of float periods

_Sample = tuple[float, float, float]  # (t seconds, x px, y px)


@dataclass(frozen=True)
class DetectedFixation:
    """A fixation found in raw gaze: when (seconds, the samples' clock) and where (pixels).

    Attributes
    ----------
    onset, offset
        Time stamps of the first and the last sample of the fixation.
    x, y
        Centroid: the mean position of its samples, in the samples' pixel coordinates.
    n_samples
        How many samples it holds.
    """

    onset: float
    offset: float
    x: float
    y: float
    n_samples: int

    @property
    def duration_ms(self) -> float:
        """``(offset − onset)`` in milliseconds."""
        return (self.offset - self.onset) * 1000.0

    @property
    def midpoint(self) -> float:
        """The time halfway through the fixation (to pick the video frame it looked at)."""
        return 0.5 * (self.onset + self.offset)


class _Centroid:
    """Running sums of a fixation's samples."""

    __slots__ = ("n", "onset", "sx", "sy", "t_last")

    def __init__(self, t: float, x: float, y: float) -> None:
        self.onset, self.t_last, self.sx, self.sy, self.n = t, t, x, y, 1

    def add(self, t: float, x: float, y: float) -> None:
        self.t_last = t
        self.sx += x
        self.sy += y
        self.n += 1

    def result(self, min_duration_s: float) -> DetectedFixation | None:
        if self.t_last - self.onset + _EPS_S < min_duration_s:
            return None
        return DetectedFixation(self.onset, self.t_last, self.sx / self.n, self.sy / self.n, self.n)


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number, got {value}")
    return value


class FixationDetector(ABC):
    """Online fixation detector: feed samples with :meth:`push`, collect what they end.

    Parameters
    ----------
    px_per_deg
        Pixels per degree of visual angle of the gaze coordinates.
    min_duration_ms
        Shortest fixation reported.
    min_confidence
        Samples with a lower confidence (or NaN) are dropped.
    max_gap_ms
        A pause of valid samples longer than this ends the open fixation.
    merge_gap_ms, merge_angle_deg
        Adjacent fixations closer than both are merged; ``merge_gap_ms=0`` turns merging off.
    """

    def __init__(
        self,
        px_per_deg: float,
        *,
        min_duration_ms: float,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
        max_gap_ms: float = DEFAULT_MAX_GAP_MS,
        merge_gap_ms: float = DEFAULT_MERGE_GAP_MS,
        merge_angle_deg: float = DEFAULT_MERGE_ANGLE_DEG,
    ) -> None:
        self.px_per_deg = _positive("px_per_deg", px_per_deg)
        self.min_duration_s = _positive("min_duration_ms", min_duration_ms) / 1000.0
        self.max_gap_s = _positive("max_gap_ms", max_gap_ms) / 1000.0
        if not (math.isfinite(float(min_confidence)) and 0.0 <= float(min_confidence) <= 1.0):
            raise ConfigError(f"min_confidence must lie in [0, 1], got {min_confidence}")
        self.min_confidence = float(min_confidence)
        if not (math.isfinite(float(merge_gap_ms)) and float(merge_gap_ms) >= 0):
            raise ConfigError(f"merge_gap_ms must be a number >= 0 (0: no merging), got {merge_gap_ms}")
        self.merge_gap_s = float(merge_gap_ms) / 1000.0
        self.merge_angle_deg = _positive("merge_angle_deg", merge_angle_deg)
        self._held: DetectedFixation | None = None  # the last fixation, waiting for a possible merge
        self._last_t: float | None = None  # last sample seen, valid or not
        self._last_valid_t: float | None = None
        self.samples_seen = 0
        self.samples_dropped = 0

    def push(self, t: float, x: float, y: float, conf: float = 1.0) -> list[DetectedFixation]:
        """Feed one sample; return the fixations it ended (usually none, sometimes one).

        Parameters
        ----------
        t
            Time stamp in seconds (any origin, increasing).
        x, y
            Gaze point in pixels; NaN marks a missing sample.
        conf
            Confidence in [0, 1]; below ``min_confidence`` the sample is dropped.

        Raises
        ------
        InputError
            ``t`` is not a finite number.
        """
        t = float(t)
        if not math.isfinite(t):
            raise InputError(f"gaze sample time stamp must be a finite number of seconds, got {t}")
        self.samples_seen += 1
        ended: list[DetectedFixation] = []
        released: list[DetectedFixation] = []
        if self._last_t is not None and t <= self._last_t:
            if t == self._last_t:  # a repeated sample: a zero time step has no velocity
                self.samples_dropped += 1
                return released
            log.warning(
                "gaze time went back from %.6f to %.6f s: treating it as a new recording", self._last_t, t
            )
            released += self.flush()
        self._last_t = t
        x, y, conf = float(x), float(y), float(conf)
        valid = math.isfinite(x) and math.isfinite(y) and conf >= self.min_confidence
        if self._last_valid_t is not None and t - self._last_valid_t > self.max_gap_s:
            # Report the fixation as soon as the gap is long enough, not when tracking resumes.
            ended += self._end_segment()
            self._last_valid_t = None
        if valid:
            self._last_valid_t = t
            ended += self._add(t, x, y)
        else:
            self.samples_dropped += 1
        return released + self._release(ended, *self._pending(t))

    def flush(self) -> list[DetectedFixation]:
        """End the data: return the open fixation (if long enough) and forget the clock."""
        ended = self._release(self._end_segment(), math.inf, None)
        self._last_t = self._last_valid_t = None
        return ended

    def _release(
        self, ended: list[DetectedFixation], horizon: float, open_centre: tuple[float, float] | None
    ) -> list[DetectedFixation]:
        """Merge new fixations into the held one; release those no later fixation can merge with.

        ``horizon`` is the earliest onset a fixation not yet found could have; ``open_centre`` the
        centroid of the open fixation once it has lasted the minimum duration (it will be reported).
        """
        if self.merge_gap_s <= 0.0:
            return ended
        out: list[DetectedFixation] = []
        for fix in ended:
            held = self._held
            if held is None:
                self._held = fix
            elif fix.onset - held.offset <= self.merge_gap_s and (
                math.hypot(fix.x - held.x, fix.y - held.y) / self.px_per_deg <= self.merge_angle_deg
            ):
                n = held.n_samples + fix.n_samples
                x = (held.x * held.n_samples + fix.x * fix.n_samples) / n
                y = (held.y * held.n_samples + fix.y * fix.n_samples) / n
                self._held = DetectedFixation(held.onset, fix.offset, x, y, n)
            else:
                out.append(held)
                self._held = fix
        held = self._held
        if held is not None and (
            horizon - held.offset > self.merge_gap_s
            or (
                open_centre is not None
                and math.hypot(open_centre[0] - held.x, open_centre[1] - held.y) / self.px_per_deg
                > self.merge_angle_deg
            )
        ):
            out.append(held)
            self._held = None
        return out

    @abstractmethod
    def _pending(self, now: float) -> tuple[float, tuple[float, float] | None]:
        """The earliest onset a fixation not yet found could have (``now`` when no sample is pending),
        and the centroid of the open fixation if it already lasts the minimum duration."""

    @abstractmethod
    def _add(self, t: float, x: float, y: float) -> list[DetectedFixation]:
        """Take one valid sample that continues the current segment."""

    @abstractmethod
    def _end_segment(self) -> list[DetectedFixation]:
        """The segment of contiguous valid samples ended: close what is open."""


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


def make_detector(method: str, px_per_deg: float, **options: float) -> FixationDetector:
    """Build a detector by name: ``"ivt"`` or ``"idt"``; ``options`` go to its constructor.

    >>> make_detector("idt", 35.0, dispersion_threshold=0.8).dispersion_threshold
    0.8
    """
    kinds: dict[str, type[IVTDetector] | type[IDTDetector]] = {"ivt": IVTDetector, "idt": IDTDetector}
    key = method.strip().lower().replace("-", "")
    if key not in kinds:
        raise ConfigError(f"unknown fixation detector {method!r}: use 'ivt' (velocity) or 'idt' (dispersion)")
    return kinds[key](px_per_deg, **options)  # type: ignore[arg-type]


def detect_all(
    detector: FixationDetector,
    samples: Iterable[tuple[float, float, float] | tuple[float, float, float, float]],
) -> list[DetectedFixation]:
    """Run a detector over a whole recording of ``(t, x, y)`` or ``(t, x, y, conf)`` samples."""
    found: list[DetectedFixation] = []
    for sample in samples:
        found += detector.push(*sample)
    return found + detector.flush()
