"""bench.peripheral: the preview is centred on the saccade's target and loses detail with eccentricity."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from bench.peripheral import peripheral_view, preview_samples, saccade_features

PPD = 24.0  # px per degree


def test_the_preview_is_centred_on_the_next_fixation_not_the_current_one() -> None:
    frame = np.zeros((400, 600, 3), np.uint8)
    frame[148:153, 398:403] = 255  # a 5 x 5 spot centred on (400, 150)
    for scale in (None, 1.0):  # full resolution, and blurred at this eccentricity (about 10 deg)
        view = peripheral_view(frame, (170.0, 160.0), (400.0, 150.0), 60, PPD, scale).astype(float)
        grey = view.mean(2)  # (60, 60)
        assert grey.sum() > 0
        ys, xs = np.mgrid[:60, :60]
        cy, cx = (grey * ys).sum() / grey.sum(), (grey * xs).sum() / grey.sum()
        assert abs(cx - 30) < 0.6 and abs(cy - 30) < 0.6  # the crop's centre pixel is index 30
    # the current fixation's spot is not what the preview shows
    assert peripheral_view(frame, (400.0, 150.0), (170.0, 160.0), 60, PPD, None).max() == 0


def test_the_previews_resolution_falls_with_eccentricity() -> None:
    frame = np.zeros((200, 1400, 3), np.uint8)
    frame[:, (np.arange(1400) // 2) % 2 == 1] = 255  # vertical stripes of period 4 px: 6 c/deg
    target = (1200.0, 100.0)
    spread = []
    for ecc in (1.0, 8.0, 20.0, 40.0):
        view = peripheral_view(frame, (target[0] - ecc * PPD, 100.0), target, 100, PPD).astype(float)
        spread.append(view.std())
    full = frame[50:150, 1150:1250].astype(float).std()
    assert spread[0] == full  # 6 c/deg is below the cutoff near the fovea (about 27 c/deg at 1 deg)
    assert spread[0] > spread[1] > spread[2] >= spread[3]
    assert spread[2] < 0.2 * full  # above the cutoff at 20 deg (about 4 c/deg): the stripes are gone
    samples = [preview_samples(e, 100, PPD) for e in range(0, 60, 2)]
    assert all(a >= b for a, b in itertools.pairwise(samples)) and samples[-1] < samples[0]
    assert preview_samples(40.0, 100, PPD, None) == 100  # full resolution: no loss at any eccentricity


def test_saccade_features_describe_each_saccade_in_degrees() -> None:
    xy = torch.tensor([[100.0, 100.0], [172.0, 100.0], [172.0, 4.0]])  # 3 deg right, then 4 deg up
    s = saccade_features(xy, PPD)
    assert s.shape == (2, 15)
    assert torch.allclose(s[:, :3], torch.tensor([[3.0, 0.0, 3.0], [0.0, -4.0, 4.0]], dtype=s.dtype))
    assert ((s[:, 3:] > 0) & (s[:, 3:] <= 1)).all()  # the bumps
