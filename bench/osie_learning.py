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

from clients.recorded import Fixation, RecordedDataset, default_dataset_path
from learner import BPTTLearner, ModelConfig, RFPLearner, StreamLearner
from learner.diagnostics import covariance_spectrum, participation_ratio
from learner.patches import cut_patch, preprocess
from learner.streaming import TickOutput

log = logging.getLogger(__name__)


@dataclass
class Tick:
    """One tick of interleaved sessions, with trunk features already computed."""

    ids: list[str]
    u: torch.Tensor  # (B, M)
    reset: list[bool]
    meta: list[tuple[str, str, int]]  # (subject, image, fix_index)
    preview: torch.Tensor | None = None  # (B, F) each fixation's preview (bench.controls --preview)


def feature_ticks(
    learner: StreamLearner,
    ds: RecordedDataset,
    *,
    images: Sequence[str],
    subjects: Sequence[str] | None = None,
    patch_px: int = 50,
    batch: int = 64,
) -> list[Tick]:
    """Cut every fixation's patch, run the frozen trunk once, and group into interleaved ticks.

    The trunk runs on about ``batch`` patches at a time, pooled over consecutive ticks: a tick holds
    one fixation per stream (a handful), and a CPU convolution is far cheaper per patch in larger
    batches. The trunk is frozen and in eval mode, so the features do not depend on the pooling.
    """
    ticks: list[Tick] = []
    pending: list[tuple[list[tuple[str, Fixation, bool]], list[np.ndarray]]] = []

    def flush() -> None:
        x = preprocess(
            [p for _, patches in pending for p in patches],
            learner.cfg.input_size,
            device=learner.device,
            dtype=learner.dtype,
        )
        u = learner.model.encode(x)  # (sum of B, M)
        start = 0
        for tick, _ in pending:
            ticks.append(
                Tick(
                    ids=[sid for sid, _, _ in tick],
                    u=u[start : start + len(tick)].clone(),  # (B, M), not a view that pins the batch
                    reset=[r for _, _, r in tick],
                    meta=[(f.subject, f.image, f.fix_index) for _, f, _ in tick],
                )
            )
            start += len(tick)
        pending.clear()

    with torch.no_grad():
        for tick in ds.interleaved(subjects=subjects, images=list(images)):
            pending.append(
                (tick, [cut_patch(ds.load_image(f.image), f.x, f.y, patch_px) for _, f, _ in tick])
            )
            if sum(len(t) for t, _ in pending) >= batch:
                flush()
        if pending:
            flush()
    return ticks


def stream(learner: StreamLearner, ticks: Sequence[Tick], *, learn: bool) -> list[dict[str, Any]]:
    """Feed the ticks; one record per fixation, in the order processed."""
    records = []
    for tick in ticks:
        out = learner.tick_features(tick.ids, tick.u, tick.reset, learn=learn)
        records.extend(_record(tick, out, i) for i in range(len(tick.ids)))
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
def replay(learner: StreamLearner, ticks: Sequence[Tick]) -> list[dict[str, Any]]:
    """Replay the ticks through a frozen copy of the learner: one record per fixation, in order.

    Each record holds what ``stream`` gives, plus the fixation's embedding ``z`` = E kappa_t (a numpy
    array (D,)) and ``repeat_error`` = D(z_{t-1}, z_t), the error of predicting the next embedding
    as the current one ("repeat" baseline; None at the first fixation after a reset). The learner
    itself is left untouched: weights, input statistics and streams.
    """
    probe = _clone_frozen(learner)
    model, records = probe.model, []
    for tick in ticks:
        out = probe.tick_features(tick.ids, tick.u, tick.reset, learn=False)
        slots = probe.states.slots(tick.ids)
        z = model.embed(probe.states.u[slots], probe.states.h[slots])  # (B, D)
        for i in range(len(tick.ids)):
            rec = _record(tick, out, i)
            rep = float(out.repeat_error[i])
            rec["repeat_error"] = None if math.isnan(rep) else rep
            rec["z"] = z[i].double().cpu().numpy()
            records.append(rec)
    return records


def _record(tick: Tick, out: TickOutput, i: int) -> dict[str, Any]:
    """The record of fixation i of a tick: who, where, its step and error (None if unscored)."""
    subject, image, fix_index = tick.meta[i]
    err = float(out.error[i])
    return {
        "stream": tick.ids[i],
        "subject": subject,
        "image": image,
        "fix_index": fix_index,
        "step": int(out.step[i]),
        "error": None if math.isnan(err) else err,
    }


def repeat_baseline(learner: StreamLearner, ticks: Sequence[Tick]) -> float:
    """Error of predicting the next embedding as this one, D(z_t, z_{t+1}), with the learner's weights."""
    vals = [r["repeat_error"] for r in replay(learner, ticks) if r["repeat_error"] is not None]
    return float(np.mean(vals)) if vals else math.nan


def embedding_dimensionality(learner: StreamLearner, ticks: Sequence[Tick], *, window: int = 2000) -> float:
    """Participation ratio of the embedding covariance over held-out fixations (states replayed)."""
    z = torch.as_tensor(np.stack([r["z"] for r in replay(learner, ticks)]))[-window:]  # (W, D)
    return participation_ratio(covariance_spectrum(z))


def _clone_frozen(learner: StreamLearner) -> RFPLearner:
    probe = RFPLearner(learner.cfg, device=learner.device, dtype=learner.dtype)
    probe.model.load_state_dict(learner.model.state_dict())
    return probe


def untrained_reference(
    cfg: ModelConfig, ticks: Sequence[Tick], epochs: int, device: str
) -> tuple[StreamLearner, float]:
    """The model at its seeded initialisation, with the running statistics it gathers from the ticks.

    The input whitening (and, with ``cfg.context_norm``, the whitening of the state, which depends on
    the weights) are statistics, not learning: the untrained model gets its own, by the learners'
    own code path with learning rate 0. BPTT with a window of 1 is the cheapest learner to run.
    """
    t0 = time.perf_counter()
    ref = BPTTLearner(cfg.replace(lr=0.0), device=device, window=1)
    weights = {k: v.clone() for k, v in ref.model.named_parameters() if not k.startswith("trunk.")}
    for _ in range(epochs):
        stream(ref, ticks, learn=True)
    moved = [k for k, v in ref.model.named_parameters() if k in weights and not torch.equal(v, weights[k])]
    assert not moved, f"learning rate 0 changed the weights {moved}"
    return ref, time.perf_counter() - t0


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
    t0 = time.perf_counter()
    train = feature_ticks(learner, ds, images=train_list, subjects=subjects, patch_px=patch_px)
    test = feature_ticks(learner, ds, images=test_list, subjects=test_subjects or subjects, patch_px=patch_px)
    t_features = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_records: list[dict[str, Any]] = []
    for _ in range(epochs):
        train_records = stream(learner, train, learn=True)
    t_learn = time.perf_counter() - t0
    untrained, _ = untrained_reference(cfg, train, epochs, device)
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
    ap.add_argument("--trunk", default=ModelConfig.trunk)
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
