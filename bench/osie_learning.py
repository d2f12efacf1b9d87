"""Does online RFP learn on real eye-tracking data? Streaming OSIE sessions through the learner.

One stream per subject; images in a fixed order; each scanpath in order; the state is reset at each
new image. Training is online (prequential: every fixation is scored before the model learns from
it). The frozen trunk's features are computed once per fixation and reused by every learner, which
is exact because the trunk never learns.

Reported:
* the prequential error over the last part of training against the *untrained* model on the same
  fixations;
* on held-out images (and, optionally, held-out subjects): error by time step within a scanpath
  before and after learning, and a "repeat the current embedding" baseline;
* the effective dimensionality of the embedding (participation ratio; the paper: ~50 of 120).

Usage (the full version; the tests run a small one)::

    python -m bench.osie_learning --dataset ../shared/data/osie --train-images 500 --test-images 100
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.recorded import RecordedDataset, default_dataset_path
from learner import ModelConfig, RFPLearner, StreamLearner
from learner.diagnostics import covariance_spectrum, participation_ratio
from learner.model import prediction_loss
from learner.patches import cut_patch, preprocess

log = logging.getLogger(__name__)


@dataclass
class Tick:
    """One tick of interleaved sessions, with trunk features already computed."""

    ids: list[str]
    u: torch.Tensor  # (B, M)
    reset: list[bool]
    meta: list[tuple[str, str, int]]  # (subject, image, fix_index)


def feature_ticks(
    learner: StreamLearner,
    ds: RecordedDataset,
    *,
    images: Sequence[str],
    subjects: Sequence[str] | None = None,
    patch_px: int = 50,
) -> list[Tick]:
    """Cut every fixation's patch, run the frozen trunk once, and group into interleaved ticks."""
    ticks = []
    with torch.no_grad():
        for tick in ds.interleaved(subjects=subjects, images=list(images)):
            patches = [cut_patch(ds.load_image(f.image), f.x, f.y, patch_px) for _, f, _ in tick]
            x = preprocess(patches, learner.cfg.input_size, device=learner.device, dtype=learner.dtype)
            ticks.append(
                Tick(
                    ids=[sid for sid, _, _ in tick],
                    u=learner.model.encode(x),
                    reset=[r for _, _, r in tick],
                    meta=[(f.subject, f.image, f.fix_index) for _, f, _ in tick],
                )
            )
    return ticks


def stream(learner: StreamLearner, ticks: Sequence[Tick], *, learn: bool) -> list[dict[str, Any]]:
    """Feed the ticks; one record per fixation, in the order processed."""
    records = []
    for tick in ticks:
        out = learner.tick_features(tick.ids, tick.u, tick.reset, learn=learn)
        for i, (subject, image, fix_index) in enumerate(tick.meta):
            err = float(out.error[i])
            records.append(
                {
                    "stream": tick.ids[i],
                    "subject": subject,
                    "image": image,
                    "fix_index": fix_index,
                    "step": int(out.step[i]),
                    "error": None if math.isnan(err) else err,
                }
            )
    return records


def by_step(records: Sequence[dict[str, Any]], max_step: int = 10) -> dict[int, dict[str, float]]:
    """Mean error (and its standard error) at each time step within a scanpath."""
    groups: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if r["error"] is not None:
            groups[min(r["step"], max_step)].append(r["error"])
    out = {}
    for step in sorted(groups):
        v = np.asarray(groups[step])
        out[step] = {
            "mean": float(v.mean()),
            "sem": float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0,
            "n": len(v),
        }
    return out


def mean_error(records: Sequence[dict[str, Any]]) -> float:
    vals = [r["error"] for r in records if r["error"] is not None]
    return float(np.mean(vals)) if vals else math.nan


@torch.no_grad()
def repeat_baseline(learner: StreamLearner, ticks: Sequence[Tick]) -> float:
    """Error of predicting the next embedding as this one, D(z_t, z_{t+1}), with the learner's weights."""
    model, errors, last = learner.model, [], {}
    h_state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for tick in ticks:
        for i, sid in enumerate(tick.ids):
            if tick.reset[i] or sid not in h_state:
                zero = model.zero_state(1)
                h_state[sid] = (zero, zero)
                last.pop(sid, None)
            h, c, _ = model.rgc.step(model.normalize(tick.u[i : i + 1], update=False), *h_state[sid])
            h_state[sid] = (h, c)
            z = model.embed(h)
            if sid in last:
                errors.append(float(prediction_loss(last[sid], z, model.cfg.loss)))
            last[sid] = z
    return float(np.mean(errors))


def embedding_dimensionality(learner: StreamLearner, ticks: Sequence[Tick], *, window: int = 2000) -> float:
    """Participation ratio of the embedding covariance over held-out fixations (states replayed)."""
    zs = []
    probe = _clone_frozen(learner)
    for tick in ticks:
        probe.tick_features(tick.ids, tick.u, tick.reset, learn=False)
        slots = probe.states.slots(tick.ids)
        zs.append(probe.model.embed(probe.states.h[slots]).detach())
    z = torch.cat(zs)[-window:]
    return participation_ratio(covariance_spectrum(z))


def _clone_frozen(learner: StreamLearner) -> RFPLearner:
    probe = RFPLearner(learner.cfg, device=learner.device, dtype=learner.dtype)
    probe.model.load_state_dict(learner.model.state_dict())
    return probe


def run(
    dataset: str | Path,
    cfg: ModelConfig,
    *,
    train_images: int | Sequence[str],
    test_images: int | Sequence[str],
    subjects: Sequence[str] | None = None,
    test_subjects: Sequence[str] | None = None,
    patch_px: int = 50,
    epochs: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train online on the first images, evaluate on the next ones; see the module docstring."""
    ds = RecordedDataset.open(dataset)
    n_train = train_images if isinstance(train_images, int) else len(train_images)
    train_list = ds.images[:n_train] if isinstance(train_images, int) else list(train_images)
    test_list = (
        ds.images[n_train : n_train + test_images] if isinstance(test_images, int) else list(test_images)
    )
    learner = RFPLearner(cfg, device=device)
    untrained = _clone_frozen(learner)
    t0 = time.perf_counter()
    train = feature_ticks(learner, ds, images=train_list, subjects=subjects, patch_px=patch_px)
    test = feature_ticks(learner, ds, images=test_list, subjects=test_subjects or subjects, patch_px=patch_px)
    t_features = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_records: list[dict[str, Any]] = []
    for _ in range(epochs):
        train_records = stream(learner, train, learn=True)
    t_learn = time.perf_counter() - t0
    # the untrained model gets the same input whitening: it is preprocessing, not gradient learning
    if learner.model.input_norm is not None and untrained.model.input_norm is not None:
        untrained.model.input_norm.load_state_dict(learner.model.input_norm.state_dict())
    untrained_train = stream(_clone_frozen(untrained), train, learn=False)
    before_test = stream(_clone_frozen(untrained), test, learn=False)
    after_test = stream(_clone_frozen(learner), test, learn=False)
    tail = max(1, len(train_records) * 3 // 10)  # the last 30% of training fixations
    return {
        "config": cfg.to_dict(),
        "train_images": len(train_list),
        "test_images": len(test_list),
        "train_fixations": len(train_records),
        "test_fixations": len(after_test),
        "updates_applied": learner.updates_applied,
        "train_tail_error": mean_error(train_records[-tail:]),
        "untrained_tail_error": mean_error(untrained_train[-tail:]),
        "test_error_before": mean_error(before_test),
        "test_error_after": mean_error(after_test),
        "test_by_step_before": by_step(before_test),
        "test_by_step_after": by_step(after_test),
        "repeat_baseline_after": repeat_baseline(learner, test),
        "effective_dim_before": embedding_dimensionality(untrained, test),
        "effective_dim_after": embedding_dimensionality(learner, test),
        "embed_dim": cfg.embed_dim,
        "seconds_features": t_features,
        "seconds_learning": t_learn,
        "train_records": train_records,
        "learner": learner,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(default_dataset_path()))
    ap.add_argument("--train-images", type=int, default=500)
    ap.add_argument("--test-images", type=int, default=100)
    ap.add_argument("--patch-px", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=ModelConfig.lr)
    ap.add_argument("--n-units", type=int, default=ModelConfig.n_units)
    ap.add_argument("--trunk", default="resnet18")
    ap.add_argument("--trunk-weights", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="write the summary as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = ModelConfig(trunk=args.trunk, trunk_weights=args.trunk_weights, lr=args.lr, n_units=args.n_units)
    res = run(
        args.dataset,
        cfg,
        train_images=args.train_images,
        test_images=args.test_images,
        patch_px=args.patch_px,
        epochs=args.epochs,
        device=args.device,
    )
    res.pop("learner")
    res.pop("train_records")
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
