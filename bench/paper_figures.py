"""The paper's Fig. 3 and Fig. 4 (Velarde & Parra, arXiv 2411.16695) on real free-viewing fixations.

Data: OSIE (or any recorded dataset, ``docs/dataset-format.md``), one stream per subject, images in
a fixed order, each scanpath in order, the state reset at every new image (``bench.osie_learning``).
**Held-out split**: the learners train online on the *training subjects x training images* and are
evaluated, with frozen weights, on the *test subjects x test images*; both sets are disjoint.

Three models share one seeded initialisation and one frozen trunk, whose features are computed once:
the untrained model (its seeded weights, with the running whitening statistics it gathers from the
training data at learning rate 0: statistics, not learning), the model after online RFP
(``RFPLearner``), and after BPTT (``BPTTLearner``, full history or a window K), both with the same
config and data, hence the same number of optimizer steps.

* Fig. 4 (``fig4_error_by_step.png``): (a) held-out prediction error against the step within a
  scanpath (mean +/- s.e.m. over fixations), with the "predict the current embedding again" baseline
  D(z_{t-1}, z_t) of each trained embedding; (b) the prequential training error of RFP and BPTT.
* Fig. 3 (``fig3_embedding.png``): (a) a few held-out scanpaths as trajectories of z_t in the plane
  of the first two principal components of the held-out embeddings after RFP learning; (b) the
  normalised eigenvalue spectrum of the embedding covariance before and after learning, with the
  effective dimensionality (participation ratio; the paper reports about 50 of 120 after learning).
* ``paper_figures.json``: every plotted number, the config, the split, the sizes, runtimes, machine.

    python -m bench.paper_figures --dataset ../shared/data/osie --train-images 200 --test-images 100 \\
        --train-subjects 1-12 --test-subjects 13-15 --epochs 1 --out-dir docs/figures
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.osie_learning import Tick, by_step, feature_ticks, mean_error, replay, stream, untrained_reference
from bench.paper_plots import MODELS, format_summary, plot_fig3, plot_fig4
from clients.recorded import RecordedDataset, default_dataset_path, natural_key
from learner import BPTTLearner, ModelConfig, RFPLearner, StreamLearner
from learner.diagnostics import covariance_spectrum, participation_ratio
from learner.errors import ConfigError

log = logging.getLogger(__name__)

FIG3_PNG, FIG4_PNG, JSON_NAME = "fig3_embedding.png", "fig4_error_by_step.png", "paper_figures.json"
#: Split sizes when none are given: sized so the full run takes about 10 minutes on a 2-core CPU.
DEFAULT_TRAIN_IMAGES, DEFAULT_TEST_IMAGES, TRAIN_SUBJECT_FRACTION = 200, 100, 0.8


@dataclass(frozen=True)
class Split:
    """Who and what the learners train on, and the disjoint subjects and images they are tested on."""

    train_subjects: list[str]
    test_subjects: list[str]
    train_images: list[str]
    test_images: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_subjects(text: str, known: Sequence[str]) -> list[str]:
    """Subject ids from ``"1-12"`` or ``"1,3,5-7"`` (ranges of numeric ids), checked against ``known``."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        lo, sep, hi = part.partition("-")
        if sep and lo.strip().isdigit() and hi.strip().isdigit():
            out += [str(i) for i in range(int(lo), int(hi) + 1)]
        elif part:
            out.append(part)
    unknown = [s for s in out if s not in known]
    if unknown or not out:
        raise ConfigError(f"subjects {text!r}: unknown ids {unknown}; the dataset has {', '.join(known)}")
    return list(dict.fromkeys(out))


def make_split(
    ds: RecordedDataset,
    *,
    train_images: int | None = None,
    test_images: int | None = None,
    train_subjects: Sequence[str] | None = None,
    test_subjects: Sequence[str] | None = None,
) -> Split:
    """The first ``train_images`` images train, the next ``test_images`` test (in ``ds.images`` order).

    ``None`` picks a default that fits the dataset: images up to DEFAULT_TRAIN_IMAGES and
    DEFAULT_TEST_IMAGES (at most 3/4 of the images train); subjects: the complement of the other
    set, or with neither given, the first 80% train and the rest test. Raises ``ConfigError`` when
    the sets overlap, are empty, or ask for too many images.
    """
    n = len(ds.images)
    n_train = min(DEFAULT_TRAIN_IMAGES, n * 3 // 4) if train_images is None else train_images
    n_test = min(DEFAULT_TEST_IMAGES, n - n_train) if test_images is None else test_images
    if n_train < 1 or n_test < 1 or n_train + n_test > n:
        raise ConfigError(
            f"--train-images {n_train} and --test-images {n_test} must both be >= 1 and together at most "
            f"the {n} images of {ds.name}"
        )
    subjects = ds.subjects
    if train_subjects is None and test_subjects is not None:
        train_subjects = [s for s in subjects if s not in set(test_subjects)]
    elif train_subjects is None:
        k = min(len(subjects) - 1, max(1, round(TRAIN_SUBJECT_FRACTION * len(subjects))))
        train_subjects = subjects[:k]
    if test_subjects is None:
        test_subjects = [s for s in subjects if s not in set(train_subjects)]
    both = sorted(set(train_subjects) & set(test_subjects), key=natural_key)
    if both or not train_subjects or not test_subjects:
        raise ConfigError(
            f"training subjects {list(train_subjects)} and test subjects {list(test_subjects)} must be "
            f"non-empty and disjoint (both: {both})"
        )
    images = ds.images
    return Split(
        list(train_subjects), list(test_subjects), images[:n_train], images[n_train : n_train + n_test]
    )


def train_online(
    learner: StreamLearner, ticks: Sequence[Tick], epochs: int
) -> tuple[list[float | None], float]:
    """Stream the training ticks ``epochs`` times, learning; the prequential errors, and the seconds."""
    t0, errors = time.perf_counter(), list[float | None]()
    for epoch in range(epochs):
        errors += [r["error"] for r in stream(learner, ticks, learn=True)]
        log.info("%s epoch %d: %d updates so far", type(learner).__name__, epoch + 1, learner.updates_applied)
    return errors, time.perf_counter() - t0


def learning_curve(errors: Sequence[float | None], bins: int = 20) -> list[dict[str, float]]:
    """Mean prequential error in ``bins`` consecutive, equal-count blocks of scored fixations."""
    vals = np.asarray([e for e in errors if e is not None], dtype=np.float64)
    edges = np.linspace(0, len(vals), min(bins, len(vals)) + 1).astype(int)
    return [
        {"fixations": int(hi), "mean": float(vals[lo:hi].mean())}
        for lo, hi in itertools.pairwise(edges)
        if hi > lo
    ]


def evaluate(learner: StreamLearner, ticks: Sequence[Tick], max_step: int) -> dict[str, Any]:
    """Held-out replay with frozen weights: error and repeat baseline by step, embedding spectrum."""
    records = replay(learner, ticks)
    z = torch.as_tensor(np.stack([r["z"] for r in records]))  # (T, D)
    spectrum = covariance_spectrum(z)
    repeat = [{"step": r["step"], "error": r["repeat_error"]} for r in records]
    return {
        "records": records,  # not written to JSON
        "mean_error": mean_error(records),
        "by_step": by_step(records, max_step),
        "repeat_mean_error": mean_error(repeat),
        "repeat_by_step": by_step(repeat, max_step),
        "spectrum": spectrum.tolist(),
        "effective_dim": participation_ratio(spectrum),
    }


def pca_trajectories(records: Sequence[dict[str, Any]], n_paths: int, min_len: int = 6) -> dict[str, Any]:
    """Project the first ``n_paths`` held-out scanpaths (distinct images, >= min_len fixations) on PC1-2."""
    z = np.stack([r["z"] for r in records])  # (T, D)
    mean = z.mean(0)
    _, s, vt = np.linalg.svd(z - mean, full_matrices=False)
    explained = (s**2 / max(float((s**2).sum()), 1e-300))[:2]
    paths: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(records):
        paths.setdefault((r["subject"], r["image"]), []).append(i)
    long = [(key, idx) for key, idx in paths.items() if len(idx) >= min_len]
    # distinct images first, so that the trajectories are not all of one picture; then any
    first: list[tuple[tuple[str, str], list[int]]] = []
    again: list[tuple[tuple[str, str], list[int]]] = []
    for key, idx in long:
        (again if any(key[1] == k[1] for k, _ in first) else first).append((key, idx))
    picked = (first + again)[:n_paths]
    chosen = [
        {"subject": subject, "image": image, "xy": ((z[idx] - mean) @ vt[:2].T).tolist()}  # (L, 2)
        for (subject, image), idx in picked
    ]
    return {"explained_variance_ratio": explained.tolist(), "paths": chosen}


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "load_average_1min_at_end": os.getloadavg()[0],  # the CPU may be shared; runtimes depend on it
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(
    dataset: str | Path,
    cfg: ModelConfig,
    split_args: dict[str, Any] | None = None,
    *,
    epochs: int = 1,
    bptt_window: int | None = None,
    patch_px: int = 50,
    max_step: int = 10,
    n_paths: int = 4,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train RFP and BPTT on the split's training part, evaluate all three models on its held-out part.

    ``split_args``: keyword arguments of ``make_split``. Returns a JSON-ready dict (see ``main``);
    the held-out records of each model are under the key ``"records"`` (drop it before writing).
    """
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    t_start = time.perf_counter()
    ds = RecordedDataset.open(dataset)
    split = make_split(ds, **(split_args or {}))
    rfp = RFPLearner(cfg, device=device)
    bptt = BPTTLearner(cfg, device=device, window=bptt_window)
    t0 = time.perf_counter()
    # one seeded frozen trunk for all: the features are computed once and shared
    train = feature_ticks(
        rfp, ds, images=split.train_images, subjects=split.train_subjects, patch_px=patch_px
    )
    test = feature_ticks(rfp, ds, images=split.test_images, subjects=split.test_subjects, patch_px=patch_px)
    seconds = {"features": time.perf_counter() - t0}
    log.info("trunk features of %d + %d ticks in %.1f s", len(train), len(test), seconds["features"])
    curves = {}
    for name, learner in (("rfp", rfp), ("bptt", bptt)):
        errors, seconds[f"train_{name}"] = train_online(learner, train, epochs)
        curves[name] = learning_curve(errors)
    untrained, seconds["untrained_statistics"] = untrained_reference(cfg, train, epochs, device)
    t0 = time.perf_counter()
    evals = {
        name: evaluate(m, test, max_step) for name, m in zip(MODELS, (untrained, rfp, bptt), strict=True)
    }
    seconds["evaluate"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    n_train_fix = sum(len(t.ids) for t in train)
    return {
        "paper": "Velarde & Parra, R-JEPA with Recurrent Forward Propagation, arXiv 2411.16695",
        "config": cfg.to_dict(),
        "bptt_window": bptt_window,
        "epochs": epochs,
        "patch_px": patch_px,
        "split": split.to_dict(),
        "disjoint": {
            "subjects": not set(split.train_subjects) & set(split.test_subjects),
            "images": not set(split.train_images) & set(split.test_images),
        },
        "dataset": {
            "name": ds.name,
            "path": str(Path(dataset).resolve()),
            "images": len(ds.images),
            "subjects": len(ds.subjects),
            "fixations": ds.n_fixations,
            "train_fixations": n_train_fix,
            "test_fixations": len(evals["rfp"]["records"]),
            "test_scanpaths": len({(r["subject"], r["image"]) for r in evals["rfp"]["records"]}),
        },
        "updates_applied": {"rfp": rfp.updates_applied, "bptt": bptt.updates_applied},
        "fig4": {
            "max_step": max_step,
            "by_step": {m: evals[m]["by_step"] for m in MODELS},
            "repeat_by_step": {m: evals[m]["repeat_by_step"] for m in MODELS},
            "learning_curve": curves,
        },
        "fig3": {
            "pca": pca_trajectories(evals["rfp"]["records"], n_paths),
            "spectrum": {m: evals[m]["spectrum"] for m in MODELS},
        },
        "summary": {
            m: {
                "test_error": evals[m]["mean_error"],
                "repeat_baseline_error": evals[m]["repeat_mean_error"],
                "effective_dim": evals[m]["effective_dim"],
            }
            for m in MODELS
        },
        "embed_dim": cfg.embed_dim,
        "seconds": seconds,
        "machine": machine(device),
        "records": {m: evals[m]["records"] for m in MODELS},
    }


def _finite_or_none(obj: Any) -> Any:
    """JSON has no NaN: non-finite floats become null (and numpy scalars plain numbers)."""
    if isinstance(obj, dict):
        return {str(k): _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    """ModelConfig defaults, overridden only by the options given (``--lr``, ``--set key=value``, ...)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    changes: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE with KEY one of {sorted(names)}")
        try:
            changes[key] = json.loads(value)  # numbers, true/false, null
        except json.JSONDecodeError:
            changes[key] = value  # a plain string such as resnet50
    for key in ("lr", "n_units", "embed_dim", "pred_hidden", "input_size", "trunk", "trunk_weights"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    return ModelConfig(**changes)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=default_dataset_path())
    ap.add_argument(
        "--train-images", type=int, default=None, help=f"first N images (default {DEFAULT_TRAIN_IMAGES})"
    )
    ap.add_argument(
        "--test-images", type=int, default=None, help=f"next K images (default {DEFAULT_TEST_IMAGES})"
    )
    ap.add_argument("--train-subjects", default=None, help="e.g. 1-12 (default: the first 80%%)")
    ap.add_argument("--test-subjects", default=None, help="e.g. 13-15 (default: the other subjects)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument(
        "--bptt-window", type=int, default=None, help="truncated BPTT window K (default: full history)"
    )
    ap.add_argument("--patch-px", type=int, default=50)
    ap.add_argument("--max-step", type=int, default=10, help="steps at or beyond this are pooled")
    ap.add_argument("--trajectories", type=int, default=4, help="scanpaths drawn in Fig. 3a")
    ap.add_argument("--out-dir", type=Path, default=Path("docs/figures"))
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--n-units", type=int, default=None)
    ap.add_argument("--embed-dim", type=int, default=None)
    ap.add_argument("--pred-hidden", type=int, default=None)
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--trunk", default=None)
    ap.add_argument("--trunk-weights", default=None)
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other ModelConfig field"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    ds_subjects = (
        RecordedDataset.open(args.dataset).subjects if args.train_subjects or args.test_subjects else []
    )
    split_args = {
        "train_images": args.train_images,
        "test_images": args.test_images,
        "train_subjects": parse_subjects(args.train_subjects, ds_subjects) if args.train_subjects else None,
        "test_subjects": parse_subjects(args.test_subjects, ds_subjects) if args.test_subjects else None,
    }
    res = run(
        args.dataset,
        cfg,
        split_args,
        epochs=args.epochs,
        bptt_window=args.bptt_window,
        patch_px=args.patch_px,
        max_step=args.max_step,
        n_paths=args.trajectories,
        device=args.device,
    )
    res.pop("records")
    res["command"] = " ".join(
        ["python -m bench.paper_figures", *(argv if argv is not None else sys.argv[1:])]
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot_fig4(res, args.out_dir / FIG4_PNG)
    plot_fig3(res, args.out_dir / FIG3_PNG)
    summary = format_summary(res)
    clean: dict[str, Any] = _finite_or_none(res)
    (args.out_dir / JSON_NAME).write_text(json.dumps(clean, indent=1, allow_nan=False) + "\n")
    print(summary)
    print(f"wrote {args.out_dir / FIG4_PNG}, {args.out_dir / FIG3_PNG}, {args.out_dir / JSON_NAME}")
    return clean


if __name__ == "__main__":
    main()
