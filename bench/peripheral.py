"""The saccade's target as an input: the saccade vector, and a peripheral preview of where it lands.

The ceiling (``bench.ceiling``) shows that, from the foveal patch and the scanpath so far, the next
fixated patch is hardly more identifiable than by "it looks like the current one". But the eye
does not choose its next patch blindly: when a saccade starts, the tracker knows where it goes, and
the eye has already seen the target, blurred, in the periphery. This module builds those two inputs
for each pair of consecutive fixations (t-1 -> t) of a scanpath:

* ``saccade_features``: the saccade vector (dx, dy) in degrees, its length, and a few radial basis
  functions of it (so that a linear predictor can treat short and long saccades differently);
* ``peripheral_view``: the image around the next fixation as seen from the current one: a square
  crop centred on the next fixation, low-pass filtered to what acuity allows at the saccade's
  eccentricity (blurred and downsampled to the Nyquist rate of the cutoff, then back to the crop's
  size);
  ``preview_features`` runs the frozen trunk on it.

Acuity rule (Geisler & Perry 1998, "A real-time foveated multiresolution system for low-bandwidth
video communication", the rule used in foveated imaging): the contrast threshold at spatial
frequency f (cycles/degree) and eccentricity e (degrees) is CT0 exp(alpha f (e + e2) / e2) with
CT0 = 1/64, alpha = 0.106, e2 = 2.3 deg, so the highest visible frequency (threshold 1) is

    f_c(e) = e2 ln(1 / CT0) / (alpha (e + e2)) ~= 90 / (e + 2.3) cycles/degree

(39 c/deg at the fovea, 12 at 5 deg, 7 at 10 deg, 4 at 20 deg). The whole crop is filtered with the
cutoff at its centre's eccentricity (a simplification: its near side is seen a little sharper). A
display at 24 px/deg shows at most 12 c/deg, so saccades shorter than about 5 deg see their target
at the display's full resolution. ``scale`` multiplies the cutoff (``scale=0.25``: a coarser eye, a
stand-in for crowding, which limits peripheral recognition more than acuity does; ``None``: no
filtering, the full-resolution upper bound).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from bench.controls import Scanpath
from clients.recorded import RecordedDataset
from learner import StreamLearner
from learner.patches import cut_patch, preprocess

# Geisler & Perry (1998)'s contrast-threshold model of peripheral vision
CT0, ALPHA, E2 = 1 / 64, 0.106, 2.3
#: names the view's construction in the preview cache's key: change it when peripheral_view changes
VIEW_RULE = "gp98-gauss-1"


def acuity_cutoff(ecc_deg: float, scale: float = 1.0) -> float:
    """Highest visible spatial frequency (cycles/degree) at eccentricity ``ecc_deg``, times ``scale``.

    >>> round(acuity_cutoff(0.0), 1), round(acuity_cutoff(10.0), 1)
    (39.2, 7.3)
    """
    return scale * E2 * math.log(1 / CT0) / (ALPHA * (max(ecc_deg, 0.0) + E2))


def preview_samples(ecc_deg: float, crop_px: int, px_per_deg: float, scale: float | None = 1.0) -> int:
    """Samples across a crop of ``crop_px`` image pixels that the eye resolves at ``ecc_deg``: twice
    the cutoff (Nyquist) times the crop's width in degrees, at most the display's ``crop_px``.

    >>> [preview_samples(e, 100, 24.0) for e in (2.0, 10.0)], preview_samples(10.0, 100, 24.0, None)
    ([100, 61], 100)
    """
    if scale is None:
        return crop_px
    n = round(2 * acuity_cutoff(ecc_deg, scale) * crop_px / px_per_deg)
    return int(min(crop_px, max(1, n)))


def peripheral_view(
    frame: np.ndarray,
    now: tuple[float, float],
    target: tuple[float, float],
    crop_px: int,
    px_per_deg: float,
    scale: float | None = 1.0,
) -> np.ndarray:
    """The (crop_px, crop_px, 3) region centred on ``target`` as seen while fixating ``now``: cut at
    the display's resolution, low-passed (a Gaussian of half the sample spacing, then averaged down
    to ``preview_samples``) and interpolated back up: the trunk gets its usual pixel grid, without
    the detail the periphery lacks.

    >>> frame = np.zeros((600, 800, 3), np.uint8)
    >>> peripheral_view(frame, (100.0, 100.0), (400.0, 300.0), 100, 24.0).shape
    (100, 100, 3)
    """
    crop = cut_patch(frame, target[0], target[1], crop_px)  # (C, C, 3) at the display's resolution
    ecc = math.hypot(target[0] - now[0], target[1] - now[1]) / px_per_deg
    n = preview_samples(ecc, crop_px, px_per_deg, scale)
    if n >= crop_px:
        return crop
    spacing = crop_px / n  # image px between the samples the eye resolves
    smooth = cv2.GaussianBlur(crop, (0, 0), sigmaX=spacing / 2)  # anti-aliasing before sampling
    small = cv2.resize(smooth, (n, n), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(cv2.resize(small, (crop_px, crop_px), interpolation=cv2.INTER_LINEAR))


# centres of the radial basis functions: the saccade vector on a 3 x 3 grid, its length at 3 values
_GRID_DEG, _GRID_WIDTH = (-8.0, 0.0, 8.0), 6.0
LENGTH_CENTRES_DEG, _LENGTH_WIDTH = (2.0, 6.0, 12.0), 3.0


def length_rbf(length_deg: torch.Tensor) -> torch.Tensor:
    """(P,) saccade lengths in degrees -> (P, 3) Gaussian bumps at 2, 6 and 12 degrees."""
    c = torch.tensor(LENGTH_CENTRES_DEG, dtype=length_deg.dtype)
    return torch.exp(-0.5 * ((length_deg[:, None] - c) / _LENGTH_WIDTH) ** 2)


def saccade_features(xy: torch.Tensor, px_per_deg: float) -> torch.Tensor:
    """(T, 2) fixation positions (px) -> (T-1, 15) features of each saccade t-1 -> t: dx, dy, length
    (degrees), 9 bumps of (dx, dy) on a grid 8 deg apart, 3 bumps of the length."""
    d = (xy[1:] - xy[:-1]).double() / px_per_deg  # (T-1, 2) degrees
    length = d.norm(dim=1)
    g = torch.tensor(_GRID_DEG, dtype=d.dtype)
    centres = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)  # (9, 2)
    grid = torch.exp(-0.5 * torch.cdist(d, centres).pow(2) / _GRID_WIDTH**2)  # (T-1, 9)
    return torch.cat([d, length[:, None], grid, length_rbf(length)], 1)


def positions(ds: RecordedDataset, path: Scanpath) -> torch.Tensor:
    """(T, 2) the scanpath's fixation positions in image pixels, in the order of ``path.u``."""
    fx = ds.scanpath(path.image, path.subject)
    if len(fx) != len(path.u):
        raise ValueError(f"scanpath {path.subject}/{path.image}: {len(fx)} fixations, {len(path.u)} features")
    return torch.tensor([[f.x, f.y] for f in fx], dtype=torch.float64)


@torch.no_grad()
def preview_features(
    learner: StreamLearner,
    ds: RecordedDataset,
    paths: Sequence[Scanpath],
    *,
    crop_px: int,
    input_px: int,
    px_per_deg: float,
    scale: float | None,
    cache: Path | None,
    batch: int = 64,
) -> list[torch.Tensor]:
    """For each scanpath, (T-1, M) trunk features of the peripheral view of fixation t from t-1,
    the crop given to the trunk at ``input_px`` (cached on disk by everything that changes them)."""
    cfg = learner.cfg
    which = [(p.subject, p.image, len(p.u)) for p in paths]
    key = json.dumps([VIEW_RULE, cfg.trunk, cfg.trunk_weights, which, crop_px, input_px, px_per_deg, scale])
    file = cache / f"preview-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt" if cache else None
    if file is not None and file.is_file():
        return torch.load(file)
    views = []
    for p in paths:
        xy, img = positions(ds, p).tolist(), ds.load_image(p.image)
        views.extend(
            peripheral_view(img, xy[t - 1], xy[t], crop_px, px_per_deg, scale) for t in range(1, len(xy))
        )
    feats = []
    for start in range(0, len(views), batch):
        x = preprocess(views[start : start + batch], input_px, device=learner.device, dtype=learner.dtype)
        feats.append(learner.model.encode(x).cpu())
    u = torch.cat(feats) if feats else paths[0].u[:0]  # (sum of T-1, M)
    out = list(u.split([len(p.u) - 1 for p in paths]))
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, file)
    return out
