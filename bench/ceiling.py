"""How predictable is the next fixated patch at all? A linear ceiling, fitted offline on trunk features.

Before asking the online learner to beat "repeat the current patch", this asks what a predictor
fitted with every advantage can do: ridge regression, fitted on the training people and images
with all of them at once (no online learning, no RFP), predicting the next patch's features from
the current patch's and the running mean of the scanpath so far (a perfect memory of the scene),
scored on held-out people and images. Features: the frozen trunk's pooled features of each patch,
centred and projected on their top-k principal components (fitted on the training patches).

Reported for each k, on held-out fixations: the ridge predictor's error, "repeat" and "predict the
scanpath's running mean", in two metrics: 1 - cos (the cosine loss) and squared error, as skill
against repeat (1 - error / repeat error). Standard errors: bootstrap over images.

Usage::

    python -m bench.ceiling --train-images 1-100 --test-images 351-400
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.controls import Scanpath, cached_features, parse_range, scanpaths_of
from clients.recorded import RecordedDataset, default_dataset_path
from learner import ModelConfig, RFPLearner


def pairs(paths: Sequence[Scanpath], f: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Inputs [x_{t-1}, mean(x_1..x_{t-1}), 1], targets x_t, the repeat x_{t-1}, the running means; images."""
    xs, ys, reps, means, images = [], [], [], [], []
    for p in paths:
        w = f(p.u)  # (T, k)
        for t in range(1, len(w)):
            mean = w[:t].mean(0)
            xs.append(torch.cat([w[t - 1], mean, w.new_ones(1)]))
            ys.append(w[t])
            reps.append(w[t - 1])
            means.append(mean)
            images.append(p.image)
    return torch.stack(xs), torch.stack(ys), torch.stack(reps), torch.stack(means), images  # type: ignore[return-value]


def skill(
    pred: torch.Tensor, y: torch.Tensor, rep: torch.Tensor, images: list[str], kind: str, draws: int = 1000
) -> list[float]:
    """Skill against repeat, 1 - sum(error) / sum(repeat error), and its standard error: the spread
    of the same pooled ratio over ``draws`` bootstrap resamples of the images (seeded)."""
    if kind == "cosine":
        e, r = 1 - F.cosine_similarity(pred, y, dim=1), 1 - F.cosine_similarity(rep, y, dim=1)
    else:
        e, r = (pred - y).pow(2).sum(1), (rep - y).pow(2).sum(1)
    names = sorted(set(images))
    index = torch.tensor([names.index(im) for im in images])
    sums_e = torch.zeros(len(names), dtype=e.dtype).index_add_(0, index, e)  # (I,) per image
    sums_r = torch.zeros(len(names), dtype=r.dtype).index_add_(0, index, r)
    picks = torch.randint(len(names), (draws, len(names)), generator=torch.Generator().manual_seed(0))
    boot = 1 - sums_e[picks].sum(1) / sums_r[picks].sum(1)  # (draws,)
    return [1 - float(e.sum() / r.sum()), float(boot.std())]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(default_dataset_path()))
    ap.add_argument("--train-subjects", default="1-12")
    ap.add_argument("--train-images", default="1-100")
    ap.add_argument("--test-subjects", default="13-15")
    ap.add_argument("--test-images", default="351-400")
    ap.add_argument("--dims", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--ridge", type=float, default=1e3)
    ap.add_argument("--cache", type=Path, default=Path("runs/cache"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    ds = RecordedDataset.open(args.dataset)
    learner = RFPLearner(ModelConfig())

    def scanpaths(images: str, subjects: str) -> list[Scanpath]:
        imgs, subs = parse_range(images, ds.images), parse_range(subjects, ds.subjects)
        return scanpaths_of(cached_features(learner, ds, imgs, subs, 50, args.cache))

    train = scanpaths(args.train_images, args.train_subjects)
    test = scanpaths(args.test_images, args.test_subjects)
    u = torch.cat([p.u for p in train]).double()
    mu = u.mean(0)
    _, vecs = torch.linalg.eigh(torch.cov((u - mu).T))
    print("| k | metric | ridge (current + running mean) | running mean | fixations |")
    print("|---|---|---|---|---|")
    for k in args.dims:
        proj = vecs[:, -k:]  # (M, k) top-k principal directions

        def f(x: torch.Tensor, proj: torch.Tensor = proj) -> torch.Tensor:
            return (x.double() - mu) @ proj

        x_tr, y_tr, *_ = pairs(train, f)
        x_te, y_te, rep, mean, images = pairs(test, f)
        a = torch.linalg.solve(
            x_tr.T @ x_tr + args.ridge * torch.eye(x_tr.shape[1], dtype=x_tr.dtype), x_tr.T @ y_tr
        )
        pred = x_te @ a
        for kind in ("cosine", "squared"):
            s_ridge = skill(pred, y_te, rep, images, kind)
            s_mean = skill(mean, y_te, rep, images, kind)
            print(
                f"| {k} | {kind} | {s_ridge[0]:+.3f} ± {s_ridge[1]:.3f} | "
                f"{s_mean[0]:+.3f} ± {s_mean[1]:.3f} | {len(images)} |"
            )


if __name__ == "__main__":
    main()
