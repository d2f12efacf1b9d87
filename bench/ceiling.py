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

Top-1 accuracy with its standard error over images (chance 10 %), and each rule's paired lead over
repeat (the difference per item, its standard error over images).

With ``--inputs``, the same predictors are also told about the saccade's target (``bench.peripheral``),
one row per input set: ``saccade`` (the vector to the next fixation in degrees, its length, radial
basis functions of both, and the current patch's features times 3 bumps of the length),
``preview`` (the trunk's features of a crop of ``--crop-factor`` patch sizes centred on the next
fixation, blurred to the acuity at the saccade's eccentricity, in its own top-k principal
components), ``preview-coarse`` (the acuity's cutoff divided by 4), ``preview-full`` (no blur: an
upper bound, nearly the target itself), or parts joined by ``+``. ``none`` is the rows above.

Usage::

    python -m bench.ceiling --train-images 1-100 --test-images 351-400
    python -m bench.ceiling --train-images 1-350 --test-images 351-700 --retrieval 1000 --dims 16 64 256
    python -m bench.ceiling --retrieval 1000 --dims 64 --inputs none saccade preview saccade+preview
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
    split_arguments,
)
from bench.peripheral import LENGTH_CENTRES_DEG, positions, preview_features, saccade_features
from clients.recorded import RecordedDataset
from learner import ModelConfig, RFPLearner, StreamLearner

#: ``extra(split, index, w)``: the inputs beyond the current patch and the running mean for the pairs
#: (t-1 -> t) of scanpath ``index`` of ``split`` ("train" or "test"), whose features are w (T, k):
#: (T-1, E), or None for none (see ``bench.peripheral``: the saccade and the peripheral preview).
Extra = Callable[[str, int, torch.Tensor], torch.Tensor | None]


def inputs(w: torch.Tensor, more: torch.Tensor | None = None) -> torch.Tensor:
    """(T, k) features of one scanpath -> (T-1, 2k + E) predictor inputs of its pairs (t-1 -> t):
    the current patch x_{t-1}, the running mean of x_0..x_{t-1}, and ``more`` (T-1, E) if given."""
    means = w.cumsum(0) / torch.arange(1, len(w) + 1, dtype=w.dtype)[:, None]  # (T, k)
    parts = [w[:-1], means[:-1]] + ([more.to(w.dtype)] if more is not None else [])
    return torch.cat(parts, 1)


def pairs(
    paths: Sequence[Scanpath],
    f: Callable[[torch.Tensor], torch.Tensor],
    extra: Extra | None = None,
    split: str = "train",
) -> tuple[torch.Tensor, ...]:
    """Inputs [x_{t-1}, mean(x_0..x_{t-1}), extras, 1], targets x_t, the repeat x_{t-1}, the running
    means; images."""
    xs, ys, images = [], [], []
    for i, p in enumerate(paths):
        w = f(p.u)  # (T, k)
        x = inputs(w, extra(split, i, w) if extra else None)  # (T-1, in)
        xs.append(torch.cat([x, x.new_ones(len(x), 1)], 1))
        ys.append(w[1:])
        images.extend([p.image] * (len(w) - 1))
    x, y = torch.cat(xs), torch.cat(ys)
    k = y.shape[1]
    return x, y, x[:, :k], x[:, k : 2 * k], images  # type: ignore[return-value]


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
    """[x, mean, extras] (n_in) -> x + MLP(...) (k); the MLP's output layer starts at zero (repeat)."""

    def __init__(self, k: int, n_in: int, hidden: int = 512) -> None:
        super().__init__()
        self.k = k
        self.lin1, self.lin2 = torch.nn.Linear(n_in, hidden), torch.nn.Linear(hidden, k)
        torch.nn.init.zeros_(self.lin2.weight)
        torch.nn.init.zeros_(self.lin2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.k] + self.lin2(torch.relu(self.lin1(x)))


def contrastive(
    model: torch.nn.Module, inp: torch.Tensor, y: torch.Tensor, hard: torch.Tensor, epochs: int, seed: int
) -> torch.nn.Module:
    """Train ``model`` (inputs (P, n_in) -> predictions (P, k)) by InfoNCE on squared distances: each
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
    extra: Extra | None = None,
) -> dict[str, tuple[float, float]]:
    """Top-1 accuracy (and s.e. over images) of each ranking rule on ``rs``, in the features ``f``,
    with the inputs ``extra`` beside the current patch and the running mean; and, under
    ``"RULE - repeat"``, each rule's paired lead over repeat (and its s.e. over images)."""
    inp, y, hard = [], [], []
    gen = torch.Generator().manual_seed(1)
    for i, p in enumerate(train):
        if len(p.u) < 3:  # no other fixation to contrast with
            continue
        w = f(p.u).float()  # (T, k)
        inp.append(inputs(w, extra("train", i, w) if extra else None))
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
    test_inputs: dict[int, torch.Tensor] = {}
    for k, t, dis in zip(rs.path, rs.step, rs.distractors, strict=True):
        if k not in test_inputs:
            w = f(test[k].u).double()  # (T, k)
            test_inputs[k] = inputs(w, extra("test", k, w) if extra else None)  # (T-1, in)
        w = f(test[k].u[: t + 1]).double()  # (t+1, k)
        ctx.append(test_inputs[k][t - 1])
        cands.append(torch.cat([w[t : t + 1], f(dis).double()]))  # (10, k): the true one first
        images.append(test[k].image)
    x_te, c = torch.stack(ctx), torch.stack(cands)  # (R, n_in), (R, 10, k)
    kdim = c.shape[-1]
    ridge_pred = torch.cat([x_te, x_te.new_ones(len(x_te), 1)], 1) @ a

    def nearest(p: torch.Tensor, weight: torch.Tensor | float = 1.0) -> torch.Tensor:
        return ((c - p[:, None]).pow(2) * weight).sum(-1)  # (R, 10): lower ranks first

    with torch.no_grad():
        n_in = x_te.shape[1]
        lin = torch.nn.Linear(n_in, kdim)
        torch.nn.init.zeros_(lin.bias)
        lin.weight.copy_(torch.cat([torch.eye(kdim), torch.zeros(kdim, n_in - kdim)], 1))  # starts at repeat
    rules = {
        "repeat": nearest(x_te[:, :kdim]),
        "ridge": nearest(ridge_pred),
        "ridge, likelihood ratio": nearest(ridge_pred, 1 / var) - c.pow(2).sum(-1),
    }
    torch.manual_seed(0)  # the MLP's initialisation
    for name, model in (("contrastive linear", lin), ("contrastive MLP", _ContrastiveMLP(kdim, n_in))):
        contrastive(model, x_tr, y_tr, hard_tr, epochs, seed=0)
        with torch.no_grad():
            rules[name] = nearest(model(x_te.float()).double())
    hits = {name: (score[:, 0] < score[:, 1:].min(1).values).double() for name, score in rules.items()}
    out = {}
    for name, hit in hits.items():
        for key, value in ((name, hit), (f"{name} - repeat", hit - hits["repeat"])):
            if key != "repeat - repeat":
                rows = [{"image": im, "v": v} for im, v in zip(images, value.tolist(), strict=True)]
                mean, sem, _ = by_image(rows, lambda r: r["v"])
                out[key] = (mean, sem)
    return out


# --- the saccade's target as an input (bench.peripheral) ---------------------------------------------
#: input parts: the saccade vector, or a preview of its target with the cutoff scaled (None: full resolution)
PREVIEWS = {"preview": 1.0, "preview-coarse": 0.25, "preview-full": None}
PARTS = ("saccade", *PREVIEWS)


def parse_inputs(spec: str) -> list[str]:
    """``"none"`` or parts joined by ``+`` (``"saccade+preview"``) -> the parts, checked."""
    parts = [] if spec == "none" else spec.split("+")
    for part in parts:
        if part not in PARTS:
            raise SystemExit(f"--inputs {spec!r}: {part!r} is not one of none, {', '.join(PARTS)}")
    return parts


def pca(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F, M) features -> their mean (M,), the covariance's eigenvalues (M,) and eigenvectors (M, M),
    ascending."""
    u = u.double()
    mu = u.mean(0)
    evals, vecs = torch.linalg.eigh(torch.cov((u - mu).T))
    return mu, evals, vecs


def projector(
    basis: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: int, whiten: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Centre and project on the top-k principal components, whitened (unit variance) if asked."""
    mu, evals, vecs = basis
    proj = vecs[:, -k:] / evals[-k:].sqrt() if whiten else vecs[:, -k:]  # (M, k)
    return lambda x: (x.double() - mu) @ proj


def target_inputs(
    ds: RecordedDataset,
    learner: StreamLearner,
    paths: dict[str, list[Scanpath]],
    parts: set[str],
    args: argparse.Namespace,
) -> Callable[[list[str], int, bool], Extra | None]:
    """The inputs about the saccade's target for every pair of ``paths`` ("train", "test"); returns
    ``extra_for(parts, k, whiten)``, the ``Extra`` of a set of parts in k dimensions.

    The saccade's features are standardised on the training pairs, and the current patch's k
    features are appended again times each of 3 bumps of the saccade's length (so a linear
    predictor can lean on "the same again" after a short saccade only). Each preview's trunk
    features are projected on their own top-k principal components (fitted on the training
    previews), whitened as the patches are."""
    ppd = args.px_per_deg or ds.px_per_deg or 24.0
    crop = round(args.crop_factor * 50)
    preview_px = args.preview_px or round(args.crop_factor * learner.cfg.input_size)
    sacc = {split: [saccade_features(positions(ds, p), ppd) for p in ps] for split, ps in paths.items()}
    s_all = torch.cat(sacc["train"])
    s_mu, s_sd = s_all.mean(0), s_all.std(0).clamp(min=1e-9)
    previews: dict[str, dict[str, list[torch.Tensor]]] = {}
    bases = {}
    for part in [p for p in PREVIEWS if p in parts]:  # a fixed order: the log reads the same
        previews[part] = {
            split: preview_features(
                learner,
                ds,
                ps,
                crop_px=crop,
                input_px=preview_px,
                px_per_deg=ppd,
                scale=PREVIEWS[part],
                cache=args.cache,
            )
            for split, ps in paths.items()
        }
        bases[part] = pca(torch.cat(previews[part]["train"]))
    print(
        f"saccade target inputs: {ppd} px/deg, preview crops {crop} px ({crop / ppd:.1f} deg) "
        f"given to the trunk at {preview_px} px; previews {sorted(previews)}\n"
    )

    def extra_for(chosen: list[str], k: int, whiten: bool) -> Extra | None:
        if not chosen:
            return None
        projs = {part: projector(bases[part], k, whiten) for part in chosen if part in PREVIEWS}

        def extra(split: str, i: int, w: torch.Tensor) -> torch.Tensor:
            cols = []
            if "saccade" in chosen:
                s = sacc[split][i]  # (T-1, 15)
                gates = s[:, -len(LENGTH_CENTRES_DEG) :]  # (T-1, 3) bumps of the length
                cols += [(s - s_mu) / s_sd, (w[:-1, :, None] * gates[:, None, :]).flatten(1)]
            cols += [proj(previews[part][split][i]) for part, proj in projs.items()]
            return torch.cat([c.to(w.dtype) for c in cols], 1)

        return extra

    return extra_for


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    split_arguments(ap, train_images="1-100", test_images="351-400")
    ap.add_argument("--dims", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--ridge", type=float, default=1e3)
    ap.add_argument("--cache", type=Path, default=Path("runs/cache"))
    ap.add_argument("--retrieval", type=int, default=0, help="also the retrieval ceiling on this many items")
    ap.add_argument("--nce-epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--inputs",
        nargs="+",
        default=["none"],
        help=f"input sets beside the current patch and the running mean, one row each: none, or parts "
        f"of {', '.join(PARTS)} joined by + (e.g. saccade+preview)",
    )
    ap.add_argument("--crop-factor", type=float, default=2.0, help="preview crop, in patch sizes")
    ap.add_argument(
        "--preview-px", type=int, default=0, help="trunk input for previews (0: crop factor x input)"
    )
    ap.add_argument("--px-per-deg", type=float, default=0.0, help="0: the dataset's, else 24")
    args = ap.parse_args(argv)
    specs = {spec: parse_inputs(spec) for spec in args.inputs}
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
    basis = pca(torch.cat([p.u for p in train]))
    used = {part for parts in specs.values() for part in parts}
    extra_for = target_inputs(ds, learner, {"train": train, "test": test}, used, args) if used else None
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
        leads = RULES[2:]
        print(f"| inputs | k | {' | '.join(RULES)} | {' | '.join(f'{r} - repeat' for r in leads)} |")
        print("|---|---|" + "---|" * (len(RULES) + len(leads)))
        for spec, parts in specs.items():
            for k in args.dims:
                fw = projector(basis, k, whiten=True)
                extra = extra_for(parts, k, True) if extra_for else None
                got = retrieval_ceiling(train, test, rs, fw, args.ridge, args.nce_epochs, extra)
                cells = [f"{got[r][0]:.3f} ± {got[r][1]:.3f}" for r in RULES]
                cells += [f"{got[f'{r} - repeat'][0]:+.3f} ± {got[f'{r} - repeat'][1]:.3f}" for r in leads]
                print(f"| {spec} | {k} | " + " | ".join(cells) + " |", flush=True)
        print()
    print("| inputs | k | metric | ridge (current + running mean + inputs) | running mean | fixations |")
    print("|---|---|---|---|---|---|")
    for spec, parts in specs.items():
        for k in args.dims:
            f = projector(basis, k, whiten=False)
            extra = extra_for(parts, k, False) if extra_for else None
            x_tr, y_tr, *_ = pairs(train, f, extra, "train")
            x_te, y_te, rep, mean, images = pairs(test, f, extra, "test")
            a = torch.linalg.solve(
                x_tr.T @ x_tr + args.ridge * torch.eye(x_tr.shape[1], dtype=x_tr.dtype), x_tr.T @ y_tr
            )
            pred = x_te @ a
            for kind in ("cosine", "squared"):
                s_ridge = skill(pred, y_te, rep, images, kind)
                s_mean = skill(mean, y_te, rep, images, kind)
                print(
                    f"| {spec} | {k} | {kind} | {s_ridge[0]:+.3f} ± {s_ridge[1]:.3f} | "
                    f"{s_mean[0]:+.3f} ± {s_mean[1]:.3f} | {len(images)} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
