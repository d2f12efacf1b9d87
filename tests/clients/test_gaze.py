"""The I-VT and I-DT fixation detectors on synthetic gaze whose fixations are known.

The recording: fixations at known places and times, joined by saccades with a smooth (cosine)
position profile whose duration follows the main sequence (about 2.2 ms/deg + 21 ms), Gaussian
sensor noise on every sample, isolated low-confidence samples, and one blink (150 ms of samples
with confidence 0) in the middle of a fixation, which must split it in two.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from clients.gaze import (
    DetectedFixation,
    FixationDetector,
    IDTDetector,
    IVTDetector,
    detect_all,
    make_detector,
)
from learner.errors import ConfigError, InputError
from tests.clients._bridge_support import DT, PX_PER_DEG, TrueFixation, synthetic_gaze


def check_recovered(found: list[DetectedFixation], truth: list[TrueFixation]) -> None:
    """Same count; centroids within 0.2 deg; onset and offset within 2 samples; durations within
    2 samples on average (an edge can be one slow saccade sample off, so one duration up to 4)."""
    assert len(found) == len(truth), (
        f"found {len(found)} fixations, expected {len(truth)}: "
        f"{[(round(f.onset, 3), round(f.duration_ms)) for f in found]}"
    )
    tol = 2 * DT + 1e-9
    duration_errors = []
    for f, g in zip(found, truth, strict=True):
        assert math.hypot(f.x / PX_PER_DEG - g.x_deg, f.y / PX_PER_DEG - g.y_deg) < 0.2
        assert abs(f.onset - g.onset) <= tol, (f.onset, g.onset)
        assert abs(f.offset - g.offset) <= tol, (f.offset, g.offset)
        duration_errors.append(abs(f.duration_ms / 1000 - (g.offset - g.onset)))
    assert np.mean(duration_errors) <= tol


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("method", ["ivt", "idt"])
def test_recovers_known_fixations(method: str, seed: int) -> None:
    samples, truth = synthetic_gaze(seed)
    found = detect_all(make_detector(method, PX_PER_DEG), samples)
    check_recovered(found, truth)


@pytest.mark.parametrize("method", ["ivt", "idt"])
def test_online_fixations_come_out_as_they_end(method: str) -> None:
    """Each fixation is returned by a push shortly after it ends, long before the data ends."""
    samples, truth = synthetic_gaze(7)
    det = make_detector(method, PX_PER_DEG)
    reported_at: list[float] = []
    for t, x, y, c in samples:
        reported_at += [t] * len(det.push(t, x, y, c))
    assert len(reported_at) == len(truth) - 1  # all but the last, which needs flush()
    assert len(det.flush()) == 1
    for when, fix in zip(reported_at, truth, strict=False):
        # Reported once the next fixation is confirmed (saccade <= 50 ms + minimum duration) or the
        # merge gap (75 ms) has passed; after a blink once the gap exceeds max_gap_ms (100 ms).
        assert 0 < when - fix.offset <= 0.06 + det.min_duration_s + 0.01


@pytest.mark.parametrize("method", ["ivt", "idt"])
def test_blink_gap_ends_fixation_and_short_holes_do_not(method: str) -> None:
    det = make_detector(method, PX_PER_DEG)
    out: list[DetectedFixation] = []
    for i in range(50):  # 200 ms still
        out += det.push(i * DT, 300.0, 300.0, 1.0 if i != 20 else 0.0)
    assert out == []  # one missing sample does not end it
    out += det.push(50 * DT + 0.090, 300.0, 300.0)  # a 94 ms hole: still the same fixation
    assert out == []
    out += det.push(50 * DT + 0.300, 300.0, 300.0)  # 210 ms later: the fixation ended
    assert len(out) == 1
    assert out[0].onset == 0.0 and out[0].offset == pytest.approx(50 * DT + 0.090)


@pytest.mark.parametrize("cls", [IVTDetector, IDTDetector])
def test_nan_samples_are_missing_samples(cls: type[FixationDetector]) -> None:
    det = cls(PX_PER_DEG)
    out: list[DetectedFixation] = []
    for i in range(40):
        out += det.push(i * DT, math.nan, math.nan)
    assert out == [] and det.samples_dropped == 40
    assert det.flush() == []


@pytest.mark.parametrize("cls", [IVTDetector, IDTDetector])
def test_time_going_back_is_a_new_recording(cls: type[FixationDetector]) -> None:
    det = cls(PX_PER_DEG)
    out: list[DetectedFixation] = []
    for i in range(50):
        out += det.push(100 + i * DT, 200.0, 200.0)
    out += det.push(100 + 49 * DT, 999.0, 999.0)  # repeated time stamp: dropped
    assert out == []
    out += det.push(5.0, 600.0, 600.0)  # the source restarted with a new clock
    assert len(out) == 1 and out[0].x == pytest.approx(200.0) and out[0].n_samples == 50


def test_short_fixations_are_not_reported() -> None:
    for det, n in ((IVTDetector(PX_PER_DEG), 14), (IDTDetector(PX_PER_DEG), 24)):
        # 52 ms (I-VT, minimum 60) and 92 ms (I-DT, minimum 100) of stillness
        assert detect_all(det, [(i * DT, 50.0, 50.0) for i in range(n)]) == []


def test_thresholds_are_in_degrees() -> None:
    """The same drift is a fixation at 60 px/deg and a saccade at 10 px/deg (I-VT, 30 deg/s)."""
    drift = [(i * DT, 100.0 + i * 0.6, 100.0) for i in range(60)]  # 150 px/s
    assert len(detect_all(IVTDetector(60.0), drift)) == 1  # 2.5 deg/s
    assert detect_all(IVTDetector(1.0), drift) == []  # 150 deg/s


def test_noisy_idt_dispersion_threshold() -> None:
    """A 2-deg-wide cloud is not a fixation under a 1-deg dispersion threshold, and is under 3 deg."""
    rng = np.random.default_rng(0)
    cloud = [(i * DT, *(rng.uniform(0, 2 * PX_PER_DEG, 2) + 100)) for i in range(100)]
    assert detect_all(IDTDetector(PX_PER_DEG, dispersion_threshold=1.0), cloud) == []
    assert len(detect_all(IDTDetector(PX_PER_DEG, dispersion_threshold=4.0), cloud)) == 1


def test_bad_settings_and_input_raise_clear_errors() -> None:
    with pytest.raises(ConfigError, match="px_per_deg"):
        IVTDetector(0.0)
    with pytest.raises(ConfigError, match="velocity_samples"):
        IVTDetector(30.0, velocity_samples=0)
    with pytest.raises(ConfigError, match="min_confidence"):
        IDTDetector(30.0, min_confidence=1.5)
    with pytest.raises(ConfigError, match="ivt"):
        make_detector("hmm", 30.0)
    with pytest.raises(InputError, match="time stamp"):
        IVTDetector(30.0).push(math.inf, 1.0, 1.0)
