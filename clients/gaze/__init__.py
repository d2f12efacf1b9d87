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

Files: ``base.py`` (:class:`DetectedFixation`, :class:`FixationDetector`: what both detectors share),
``ivt.py`` (:class:`IVTDetector`), ``idt.py`` (:class:`IDTDetector`); this module builds them by name.
"""

from __future__ import annotations

from collections.abc import Iterable

from clients.gaze.base import (
    DEFAULT_MAX_GAP_MS,
    DEFAULT_MERGE_ANGLE_DEG,
    DEFAULT_MERGE_GAP_MS,
    DEFAULT_MIN_CONFIDENCE,
    DetectedFixation,
    FixationDetector,
)
from clients.gaze.idt import IDTDetector
from clients.gaze.ivt import IVTDetector
from learner.errors import ConfigError

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
