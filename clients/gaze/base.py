"""What both detectors share: :class:`DetectedFixation`, the defaults, and :class:`FixationDetector`,
which screens samples (confidence, NaN, gaps, time going back) and merges adjacent fixations before the
I-VT or I-DT rule (``ivt.py``, ``idt.py``) sees them. The package docstring describes the behaviour.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from learner.errors import ConfigError, InputError

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
