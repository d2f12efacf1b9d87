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

With ``--retrieval N``, the same question for retrieval: N held-out fixations, each with the 9
counterfactual next patches of ``bench.controls`` (same construction and seed: 5 fixated spots of
the same image at least a patch from the true and the current fixation, 4 fixated patches of other
images), ranked in the top-k principal components whitened (unit variance on the training
patches), by

* ``repeat``: nearest to the current patch;
* ``ridge``: nearest to the ridge prediction (the regression's conditional mean);
* ``ridge, likelihood ratio``: the Gaussian log-likelihood ratio of each candidate under the ridge
  prediction (with its per-dimension residual variance) against the marginal (the training mean,
  unit variance): what an MSE-trained predictor can say about a candidate beyond its typicality;
* ``contrastive linear`` and ``contrastive MLP`` (z plus a ReLU MLP): predictors trained offline for
  retrieval itself (InfoNCE: the true next patch against the other pairs' in a batch of 256 and 5
  other fixations of the same scanpath, a learned temperature, Adam, ``--nce-epochs``), from the
  current patch and the scanpath's running mean; nearest to the prediction.

Top-1 accuracy with its standard error over images (chance 10 %).

Usage::

    python -m bench.ceiling --train-images 1-100 --test-images 351-400
    python -m bench.ceiling --train-images 1-350 --test-images 351-700 --retrieval 1000 --dims 16 64 256
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.controls import (
    RetrievalSet,
    Scanpath,
    by_image,
    cached_features,
    held_out_split,
    retrieval_set,
    scanpaths_of,
)
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


RULES = ("repeat", "ridge", "ridge, likelihood ratio", "contrastive linear", "contrastive MLP")


# --- retrieval ------------------------------------------------------------------------------------
class _ContrastiveMLP(torch.nn.Module):
    """[x, mean] (2k) -> x + MLP([x, mean]) (k); the MLP's output layer starts at zero (repeat)."""

    def __init__(self, k: int, hidden: int = 512) -> None:
        super().__init__()
        self.k = k
        self.lin1, self.lin2 = torch.nn.Linear(2 * k, hidden), torch.nn.Linear(hidden, k)
        torch.nn.init.zeros_(self.lin2.weight)
        torch.nn.init.zeros_(self.lin2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.k] + self.lin2(torch.relu(self.lin1(x)))


def contrastive(
    model: torch.nn.Module, inp: torch.Tensor, y: torch.Tensor, hard: torch.Tensor, epochs: int, seed: int
) -> torch.nn.Module:
    """Train ``model`` (inputs (P, 2k) -> predictions (P, k)) by InfoNCE on squared distances: each
    pair's true next patch y (P, k) against the batch's other next patches and ``hard`` (P, n, k)."""
    torch.manual_seed(seed)
    log_tau = torch.nn.Parameter(torch.tensor(float(y.shape[1])).log())
    opt = torch.optim.Adam([*model.parameters(), log_tau], lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(len(inp), generator=gen).split(256):
            p = model(inp[rows])  # (b, k)
            dist = torch.cat([torch.cdist(p, y[rows]).pow(2), (p[:, None] - hard[rows]).pow(2).sum(-1)], 1)
            loss = F.cross_entropy(-dist / log_tau.exp(), torch.arange(len(rows)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def retrieval_ceiling(
    train: Sequence[Scanpath],
    test: Sequence[Scanpath],
    rs: RetrievalSet,
    f: Callable[[torch.Tensor], torch.Tensor],
    ridge: float,
    epochs: int,
) -> dict[str, tuple[float, float]]:
    """Top-1 accuracy (and s.e. over images) of each ranking rule on ``rs``, in the features ``f``."""
    inp, y, hard = [], [], []
    gen = torch.Generator().manual_seed(1)
    for p in train:
        if len(p.u) < 3:  # no other fixation to contrast with
            continue
        w = f(p.u).float()  # (T, k)
        means = w.cumsum(0) / torch.arange(1, len(w) + 1)[:, None]
        inp.append(torch.cat([w[:-1], means[:-1]], 1))
        y.append(w[1:])
        # 5 other fixations of the same scanpath for each pair (t, t+1): neither t nor t+1
        others = torch.stack([torch.randint(len(w) - 2, (5,), generator=gen) for _ in range(len(w) - 1)])
        others += (others >= torch.arange(len(w) - 1)[:, None]).long() * 2  # skip t and t+1
        hard.append(w[others])
    x_tr, y_tr, hard_tr = torch.cat(inp), torch.cat(y), torch.cat(hard)
    ones = x_tr.new_ones(len(x_tr), 1)
    x1 = torch.cat([x_tr, ones], 1).double()
    a = torch.linalg.solve(x1.T @ x1 + ridge * torch.eye(x1.shape[1], dtype=x1.dtype), x1.T @ y_tr.double())
    var = (y_tr.double() - x1 @ a).pow(2).mean(0)  # (k,) the ridge's residual variance

    ctx, cands, images = [], [], []
    for k, t, dis in zip(rs.path, rs.step, rs.distractors, strict=True):
        w = f(test[k].u[: t + 1]).double()  # (t+1, k)
        ctx.append(torch.cat([w[t - 1], w[:t].mean(0)]))
        cands.append(torch.cat([w[t : t + 1], f(dis).double()]))  # (10, k): the true one first
        images.append(test[k].image)
    x_te, c = torch.stack(ctx), torch.stack(cands)  # (R, 2k), (R, 10, k)
    kdim = c.shape[-1]
    ridge_pred = torch.cat([x_te, x_te.new_ones(len(x_te), 1)], 1) @ a

    def nearest(p: torch.Tensor, weight: torch.Tensor | float = 1.0) -> torch.Tensor:
        return ((c - p[:, None]).pow(2) * weight).sum(-1)  # (R, 10): lower ranks first

    with torch.no_grad():
        lin = torch.nn.Linear(2 * kdim, kdim)
        torch.nn.init.zeros_(lin.bias)
        lin.weight.copy_(torch.cat([torch.eye(kdim), torch.zeros(kdim, kdim)], 1))  # starts at repeat
    rules = {
        "repeat": nearest(x_te[:, :kdim]),
        "ridge": nearest(ridge_pred),
        "ridge, likelihood ratio": nearest(ridge_pred, 1 / var) - c.pow(2).sum(-1),
    }
    torch.manual_seed(0)  # the MLP's initialisation
    for name, model in (("contrastive linear", lin), ("contrastive MLP", _ContrastiveMLP(kdim))):
        contrastive(model, x_tr, y_tr, hard_tr, epochs, seed=0)
        with torch.no_grad():
            rules[name] = nearest(model(x_te.float()).double())
    out = {}
    for name, score in rules.items():
        hits = (score[:, 0] < score[:, 1:].min(1).values).tolist()
        mean, sem, _ = by_image(
            [{"image": im, "hit": h} for im, h in zip(images, hits, strict=True)], lambda r: r["hit"]
        )
        out[name] = (mean, sem)
    return out


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
    ap.add_argument("--retrieval", type=int, default=0, help="also the retrieval ceiling on this many items")
    ap.add_argument("--nce-epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    ds = RecordedDataset.open(args.dataset)
    learner = RFPLearner(ModelConfig())

    tr_s, tr_i, te_s, te_i = held_out_split(
        ds, args.train_subjects, args.train_images, args.test_subjects, args.test_images
    )
    train = scanpaths_of(cached_features(learner, ds, tr_i, tr_s, 50, args.cache))
    test = scanpaths_of(cached_features(learner, ds, te_i, te_s, 50, args.cache))
    u = torch.cat([p.u for p in train]).double()
    mu = u.mean(0)
    evals, vecs = torch.linalg.eigh(torch.cov((u - mu).T))
    if args.retrieval:
        rs = retrieval_set(
            learner,
            ds,
            test,
            n=args.retrieval,
            same_image=5,
            patch_px=50,
            gen=torch.Generator().manual_seed(7),  # bench.controls' retrieval set
        )
        print(f"| k | {' | '.join(RULES)} |")
        print("|---|" + "---|" * len(RULES))
        for k in args.dims:
            scale = vecs[:, -k:] / evals[-k:].sqrt()  # (M, k) top-k components, whitened

            def fw(x: torch.Tensor, scale: torch.Tensor = scale) -> torch.Tensor:
                return (x.double() - mu) @ scale

            got = retrieval_ceiling(train, test, rs, fw, args.ridge, args.nce_epochs)
            print(f"| {k} | " + " | ".join(f"{got[r][0]:.3f} ± {got[r][1]:.3f}" for r in RULES) + " |")
        print()
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
