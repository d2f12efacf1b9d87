"""Why does the online predictor not use the peripheral preview? The target, tested offline.

``bench.ceiling`` finds that a ridge map from the preview of the next fixation (``bench.peripheral``)
to the next patch's top-64 principal components lifts retrieval far above repeat; the online model
given the same preview (``ModelConfig.preview_features``) gains nothing. The online model predicts
another target: its own embedding z = E [u; s(h)], a fixed random projection of *all* M whitened
trunk features u and of the whitened state s(h), scored in the ``whitened_mse`` metric (the
whitening of the changes z_t - z_{t-1}). This script fits the same offline ridge to that target and
to variants of it, so the two can be compared on the same pairs:

1. train the default model online on the training split (as ``bench.controls`` does; the weights
   are cached), freeze it, and replay every scanpath to get each fixation's raw features u, whitened
   u and whitened state s(h);
2. for each *target* y (a function of u and s(h)), fit a ridge from [y_t] ("current", what the model
   has) and from [y_t, preview of t+1] to y_{t+1} on the training pairs, and score on held-out pairs:

   * skill = 1 - error / repeat error (``repeat``: y_t), in the target's own ``whitened_mse``
     metric (the ZCA of its changes on the training pairs, shrunk by 2 % as the model's) and in
     plain squared error, ± a bootstrap over images;
   * retrieval top-1 among 10 on ``bench.controls``' own retrieval set (same seed), each candidate's
     y built as the model builds it (its state stepped from the true one's), ranked by the
     ``whitened_mse`` distance to the prediction, as ``bench.controls.retrieval`` ranks;

   and the frozen model's own G(z_t) on the target ``z``, the check that this replay reproduces
   ``bench.controls``' transfer skill and retrieval.

Targets: ``z`` (the model's), ``z_u`` and ``z_h`` (its two parts, E_u u and E_h s(h)), ``pcs`` (the
top-k principal components of the raw trunk features, whitened: ``bench.ceiling``'s target),
``E[pcs;s]`` (a fixed random projection of the top-k whitened components and the state, the
variant "E over the top-k PCs"), ``E[raw;s]`` (E over the centred raw features scaled to unit mean
variance: each direction weighted by its variance instead of whitened).

Usage::

    python -m bench.preview_target --train-images 1-100 --test-images 351-400 --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench.ceiling import pca
from bench.controls import (
    RetrievalSet,
    Scanpath,
    attach_previews,
    by_image,
    cached_features,
    config_overrides,
    held_out_split,
    online,
    retrieval_set,
    scanpaths_of,
    split_arguments,
)
from clients.recorded import RecordedDataset
from learner import ModelConfig, RFPLearner
from learner.model import CHANGE_SHRINK, RJEPA

#: a target: (raw u (n, M), whitened u (n, M), whitened state s(h) (n, N)) -> (n, d)
Target = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def replay(model: RJEPA, paths: Sequence[Scanpath], chunk: int = 256) -> list[dict[str, torch.Tensor]]:
    """Frozen replay of each scanpath from a reset: per fixation its whitened u, the state h, c after
    it and the whitened state s(h): a dict of (T, M), (T, N), (T, N), (T, N) per scanpath."""
    out = []
    for start in range(0, len(paths), chunk):
        group = paths[start : start + chunk]
        steps = max(len(p.u) for p in group)
        u = torch.zeros(len(group), steps, model.cfg.M)  # (B, T, M), zero-padded
        for i, p in enumerate(group):
            u[i, : len(p.u)] = model.normalize(p.u.float(), update=False)
        h = c = model.zero_state(len(group))
        hs, cs = [], []
        for t in range(steps):
            h, c, _ = model.rgc.step(u[:, t], h, c)
            hs.append(h)
            cs.append(c)
        hh, cc = torch.stack(hs, 1), torch.stack(cs, 1)  # (B, T, N)
        for i, p in enumerate(group):
            n = len(p.u)
            out.append({"uw": u[i, :n], "h": hh[i, :n], "c": cc[i, :n], "s": whiten_state(model, hh[i, :n])})
    return out


def whiten_state(model: RJEPA, h: torch.Tensor) -> torch.Tensor:
    return model.context_norm.transform(h) if model.context_norm is not None else h


def change_whitening(y: torch.Tensor, y_next: torch.Tensor) -> torch.Tensor:
    """ZCA (d, d) of the changes y_next - y, shrunk towards a scaled identity as the model's
    ``whitened_mse`` metric is (``CHANGE_SHRINK`` of the mean variance)."""
    d = (y_next - y).double()
    cov = torch.cov(d.T)
    cov = cov + CHANGE_SHRINK * float(cov.diagonal().mean()) * torch.eye(len(cov), dtype=cov.dtype)
    evals, evecs = torch.linalg.eigh(cov)
    return (evecs * evals.rsqrt()) @ evecs.T


def ridge_fit(x: torch.Tensor, y: torch.Tensor, lam: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Ridge from x (n, a) to y (n, d): columns standardised on the fit, an intercept not shrunk."""
    x, y = x.double(), y.double()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-9)
    y_mu = y.mean(0)
    xs = (x - mu) / sd
    a = torch.linalg.solve(xs.T @ xs + lam * torch.eye(xs.shape[1], dtype=xs.dtype), xs.T @ (y - y_mu))
    return lambda q: ((q.double() - mu) / sd) @ a + y_mu


def skill(err: torch.Tensor, rep: torch.Tensor, images: list[str], draws: int = 1000) -> tuple[float, float]:
    """1 - sum(err) / sum(rep) over rows, and its bootstrap standard error over images (seeded)."""
    names = sorted(set(images))
    index = torch.tensor([names.index(im) for im in images])
    e = torch.zeros(len(names), dtype=torch.float64).index_add_(0, index, err.double())
    r = torch.zeros(len(names), dtype=torch.float64).index_add_(0, index, rep.double())
    picks = torch.randint(len(names), (draws, len(names)), generator=torch.Generator().manual_seed(0))
    boot = 1 - e[picks].sum(1) / r[picks].sum(1)
    return 1 - float(e.sum() / r.sum()), float(boot.std())


def targets(model: RJEPA, train_u: torch.Tensor, specs: Sequence[str]) -> dict[str, Target]:
    """The targets named in ``specs``, their statistics fitted on the training fixations' raw
    features: ``z``, ``z_u``, ``z_h`` (the model's), ``pcsK`` (the whitened top-K components of u),
    ``E:U:A`` with U ``pcsK`` or ``raw`` and A a number: a fixed random projection (the model's
    init rule, seeded by the spec) of [U; A s(h)], where ``raw`` is u centred and scaled to unit
    mean variance (directions weighted by their variance)."""
    M, N, D = model.cfg.M, model.cfg.n_units, model.cfg.embed_dim
    e_u, e_h = model.E.weight[:, :M].double(), model.E.weight[:, M:].double()  # (D, M), (D, N)
    mu, evals, vecs = pca(train_u)
    scale = float(evals.mean().sqrt())

    def part(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        if name == "raw":
            return lambda u: (u.double() - mu) / scale
        k = int(name.removeprefix("pcs"))
        top = vecs[:, -k:] / evals[-k:].sqrt()  # (M, k) whitened top-k components
        return lambda u: (u.double() - mu) @ top

    out: dict[str, Target] = {
        "z": lambda u, uw, s: uw.double() @ e_u.T + s.double() @ e_h.T,
        "z_u": lambda u, uw, s: uw.double() @ e_u.T,
        "z_h": lambda u, uw, s: s.double() @ e_h.T,
    }
    for spec in specs:
        if spec in out:
            continue
        if spec.startswith("pcs"):
            out[spec] = _of_u(part(spec))
            continue
        _, name, weight = spec.split(":")
        f, a = part(name), float(weight)
        width = (M if name == "raw" else int(name.removeprefix("pcs"))) + (N if a else 0)
        seed = int(hashlib.sha256(spec.encode()).hexdigest()[:8], 16)
        gen = torch.Generator().manual_seed(seed)
        e = (torch.rand(D, width, generator=gen, dtype=torch.float64) * 2 - 1) / width**0.5  # (D, width)

        def target(u: torch.Tensor, uw: torch.Tensor, s: torch.Tensor, f=f, a=a, e=e) -> torch.Tensor:  # type: ignore[no-untyped-def]
            cols = [f(u)] + ([a * s.double()] if a else [])
            return torch.cat(cols, 1) @ e.T

        out[spec] = target
    return {k: out[k] for k in specs}


def _of_u(f: Callable[[torch.Tensor], torch.Tensor]) -> Target:
    return lambda u, uw, s: f(u)


def pairs_of(
    paths: Sequence[Scanpath], rep: list[dict[str, torch.Tensor]], f: Target
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(y_t, y_{t+1}, preview of t+1, image) for every consecutive pair of every scanpath."""
    ys, nexts, vs, images = [], [], [], []
    for p, r in zip(paths, rep, strict=True):
        y = f(p.u, r["uw"], r["s"])  # (T, d)
        assert p.v is not None
        ys.append(y[:-1])
        nexts.append(y[1:])
        vs.append(p.v[1:])
        images += [p.image] * (len(y) - 1)
    return torch.cat(ys), torch.cat(nexts), torch.cat(vs).double(), images


@torch.no_grad()
def retrieval_items(
    model: RJEPA, paths: Sequence[Scanpath], rep: list[dict[str, torch.Tensor]], rs: RetrievalSet
) -> dict[str, torch.Tensor | list[str]]:
    """For each retrieval item, the current fixation's (u, uw, s) and the 10 candidates' (the true
    one first), each candidate's state stepped from the true state before it, as the model would."""
    cur_u, cur_uw, cur_s, cand_u, cand_uw, cand_s, v, images = [], [], [], [], [], [], [], []
    for k, t, dis in zip(rs.path, rs.step, rs.distractors, strict=True):
        p, r = paths[k], rep[k]
        cands = torch.cat([p.u[t : t + 1], dis]).float()  # (10, M)
        cw = model.normalize(cands, update=False)
        h, _, _ = model.rgc.step(cw, r["h"][t - 1].expand(10, -1), r["c"][t - 1].expand(10, -1))
        cur_u.append(p.u[t - 1])
        cur_uw.append(r["uw"][t - 1])
        cur_s.append(r["s"][t - 1])
        cand_u.append(cands)
        cand_uw.append(cw)
        cand_s.append(whiten_state(model, h))
        assert p.v is not None
        v.append(p.v[t])
        images.append(p.image)
    return {
        "cur": [torch.stack(cur_u), torch.stack(cur_uw), torch.stack(cur_s)],  # type: ignore[dict-item]
        "cand": [torch.stack(cand_u), torch.stack(cand_uw), torch.stack(cand_s)],  # type: ignore[dict-item]
        "v": torch.stack(v).double(),
        "images": images,
    }


def top1(pred: torch.Tensor, cands: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """(R,) 1.0 where the true candidate (first of 10) is strictly nearest to the prediction (R, d)
    in the metric (d, d), as ``bench.controls.retrieval`` ranks."""
    dist = ((cands - pred[:, None]) @ metric).pow(2).sum(-1)  # (R, 10)
    return (dist[:, 0] < dist[:, 1:].min(1).values).double()


def trained_model(cfg: ModelConfig, train: Sequence, cache: Path) -> RFPLearner:
    """The model after one online pass over the training ticks (cached by config and split)."""
    key = hashlib.sha256(json.dumps([cfg.to_dict(), len(train), repr(train[0].meta)]).encode()).hexdigest()[
        :16
    ]
    file = cache / f"online-{key}.pt"
    learner = RFPLearner(cfg)
    if file.is_file():
        learner.model.load_state_dict(torch.load(file))
        return learner
    t0 = time.perf_counter()
    online(learner, train)
    logging.info("trained online in %.0f s", time.perf_counter() - t0)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(learner.model.state_dict(), file)
    return learner


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    split_arguments(ap, train_images="1-100", test_images="351-400")
    ap.add_argument("--dims", type=int, default=64, help="the preview's and the pcs targets' components")
    ap.add_argument("--ridge", type=float, default=1e3)
    ap.add_argument("--retrieval", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--targets",
        nargs="+",
        default=["z", "z_u", "z_h", "pcs64", "E:pcs64:1", "E:raw:1"],
        help="z, z_u, z_h, pcsK, or E:pcsK:A / E:raw:A (a fixed random projection of [U; A s(h)])",
    )
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="ModelConfig fields")
    ap.add_argument("--cache", type=Path, default=Path("runs/cache"))
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(seed=args.seed, **config_overrides(args.set))
    ds = RecordedDataset.open(args.dataset)
    tr_s, tr_i, te_s, te_i = held_out_split(
        ds, args.train_subjects, args.train_images, args.test_subjects, args.test_images
    )
    learner = RFPLearner(cfg)
    train_ticks = cached_features(learner, ds, tr_i, tr_s, 50, args.cache)
    test_ticks = cached_features(learner, ds, te_i, te_s, 50, args.cache)
    got = attach_previews(
        learner,
        ds,
        {"train": scanpaths_of(train_ticks), "test": scanpaths_of(test_ticks)},
        saccade=False,
        cache=args.cache,
        dims=args.dims,
    )
    train, test = got["train"], got["test"]
    rs = retrieval_set(
        learner, ds, test, n=args.retrieval, same_image=5, patch_px=50, gen=torch.Generator().manual_seed(7)
    )
    model = trained_model(cfg, train_ticks, args.cache).model.eval()
    rep_tr, rep_te = replay(model, train), replay(model, test)
    items = retrieval_items(model, test, rep_te, rs)
    tgts = targets(model, torch.cat([p.u for p in train]), args.targets)
    imgs_r: list[str] = items["images"]  # type: ignore[assignment]

    def lead(hits: torch.Tensor, base: torch.Tensor) -> str:
        rows = [{"image": im, "v": float(a - b)} for im, a, b in zip(imgs_r, hits, base, strict=True)]
        m, se, _ = by_image(rows, lambda r: r["v"])
        return f"{m:+.3f} ± {se:.3f}"

    def acc(hits: torch.Tensor) -> str:
        m, se, _ = by_image(
            [{"image": im, "v": float(h)} for im, h in zip(imgs_r, hits, strict=True)], lambda r: r["v"]
        )
        return f"{m:.3f} ± {se:.3f}"

    print(f"model {cfg.to_dict()}\nridge {args.ridge}, preview: top {args.dims} components\n")
    print(
        "| target | d | predictor | skill, target's whitened_mse | skill, squared | "
        "retrieval top-1 | retrieval − repeat (paired) | R² of the next value |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, f in tgts.items():
        y, y_next, v, _ = pairs_of(train, rep_tr, f)
        yt, yt_next, vt, images_t = pairs_of(test, rep_te, f)
        metric = (
            model.change_metric().double() if name == "z" else change_whitening(y, y_next)  # type: ignore[union-attr]
        )
        cur, cand = items["cur"], items["cand"]
        rc = f(*cur)  # (R, d)
        rk = f(*(c.flatten(0, 1) for c in cand)).view(len(rc), 10, -1)  # (R, 10, d)
        base = top1(rc, rk, metric)
        rep_w = ((yt - yt_next) @ metric).pow(2).sum(1)
        rep_sq = (yt - yt_next).pow(2).sum(1)
        total = (yt_next - yt_next.mean(0)).pow(2).sum()
        print(f"| {name} | {y.shape[1]} | repeat | 0 | 0 | {acc(base)} | | |", flush=True)
        preds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if name == "z":
            g = model.G
            preds["the model, G(z_t)"] = (g(yt.float()).detach().double(), g(rc.float()).detach().double())
        for label, x_tr, x_te, x_r in (
            ("ridge [y_t]", y, yt, rc),
            (
                "ridge [y_t, preview]",
                torch.cat([y, v], 1),
                torch.cat([yt, vt], 1),
                torch.cat([rc, items["v"]], 1),
            ),
        ):
            fit = ridge_fit(x_tr, y_next, args.ridge)
            preds[label] = (fit(x_te), fit(x_r))
        for label, (p, pr) in preds.items():
            sw = skill(((p - yt_next) @ metric).pow(2).sum(1), rep_w, images_t)
            sq = skill((p - yt_next).pow(2).sum(1), rep_sq, images_t)
            r2 = 1 - float((p - yt_next).pow(2).sum() / total)
            hits = top1(pr, rk, metric)
            print(
                f"| {name} | {y.shape[1]} | {label} | {sw[0]:+.3f} ± {sw[1]:.3f} | "
                f"{sq[0]:+.3f} ± {sq[1]:.3f} | "
                f"{acc(hits)} | {lead(hits, base)} | {r2:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
