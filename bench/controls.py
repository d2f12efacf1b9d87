"""Does foveate *predict* the next fixation? The controls of spec 1.6 on held-out people and images.

One command trains a learner online on some OSIE participants and images and scores it, with the
same weights on the same fixations, against the trivial explanations of a falling error:

* **repeat**: predict the next embedding as the current one, ``D(z_{t-1}, z_t)``; skill is
  ``1 - model error / repeat error``;
* **shuffled**: each held-out scanpath's fixations in a random order (a scene's gist survives this);
* **i.i.d.**: every patch taken from a random other held-out image (no scene to learn about: a
  model that predicts content gains little from memory, so the error's fall with the step shrinks);
* **retrieval**: rank the true next embedding among 10: the true patch's, and those the model would
  reach had the eye landed on 9 other patches (``--same-image`` of them on the same image at least
  one patch away, drawn uniformly, the rest fixated patches of other held-out images); top-1
  accuracy, chance 10 %; for the model (its prediction), for repeat (the current embedding as the
  prediction) and for the untrained model;
* **untrained** (learning rate 0, same running statistics) and **transfer** (learn on the training
  people and images, freeze, score the held-out ones), and **online** (keep learning on the held-out
  people and images, prequentially: each fixation scored before it is learned from; the second half
  of that run is reported);
* effective dimensionality of the embedding on held-out fixations (participation ratio, of D).

Standard errors are over images (each image's mean over its fixations, then the spread of those
means). Every seed trains its own model; the table reports each seed. The trunk is frozen, so its
features are computed once per patch and cached (``--cache``).

Usage (the full run; ``tests/bench/test_controls.py`` runs a tiny one)::

    python -m bench.controls --train-subjects 1-12 --train-images 1-350 \\
        --test-subjects 13-15 --test-images 351-700 --seeds 0 1 --out-dir docs/figures
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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

from bench.osie_learning import Tick, _clone_frozen, feature_ticks, untrained_reference
from clients.recorded import RecordedDataset, default_dataset_path
from learner import ModelConfig, RFPLearner, StreamLearner
from learner.diagnostics import covariance_spectrum, participation_ratio
from learner.patches import cut_patch, preprocess
from learner.streaming import TickOutput

log = logging.getLogger(__name__)


@dataclass
class Scanpath:
    """One participant's fixations on one image, with their trunk features."""

    subject: str
    image: str
    u: torch.Tensor  # (T, M) raw trunk features, in scanpath order
    v: torch.Tensor | None = None  # (T, F) each fixation's preview (row 0: zeros, never read), or None


def split_arguments(ap: argparse.ArgumentParser, *, train_images: str, test_images: str) -> None:
    """The data set and the held-out split (people and images) every OSIE benchmark takes."""
    ap.add_argument("--dataset", default=str(default_dataset_path()))
    ap.add_argument("--train-subjects", default="1-12")
    ap.add_argument("--train-images", default=train_images)
    ap.add_argument("--test-subjects", default="13-15")
    ap.add_argument("--test-images", default=test_images)


def held_out_split(
    ds: RecordedDataset, train_subjects: str, train_images: str, test_subjects: str, test_images: str
) -> tuple[list[str], list[str], list[str], list[str]]:
    """The ranges as names: (train subjects, train images, test subjects, test images); people and
    images held out must not overlap the training ones."""
    tr_s, te_s = parse_range(train_subjects, ds.subjects), parse_range(test_subjects, ds.subjects)
    tr_i, te_i = parse_range(train_images, ds.images), parse_range(test_images, ds.images)
    if set(tr_s) & set(te_s) or set(tr_i) & set(te_i):
        raise SystemExit("training and held-out people and images must not overlap")
    return tr_s, tr_i, te_s, te_i


def config_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["rgc_inputs=256", "gate_bias=false"]`` -> ModelConfig keyword arguments of the fields' types."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    out: dict[str, Any] = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"--set {item!r}: ModelConfig has no field {name!r}")
        default = fields[name].default
        if isinstance(default, bool):
            if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise SystemExit(f"--set {item!r}: {name} is true or false")
            out[name] = value.lower() in ("1", "true", "yes")
        elif default is None:  # in_features, trunk_weights: text, or none
            out[name] = None if value.lower() == "none" else (int(value) if value.isdigit() else value)
        else:
            try:
                out[name] = type(default)(value)
            except ValueError:
                raise SystemExit(f"--set {item!r}: {name} is a {type(default).__name__}") from None
    return out


def parse_range(text: str, names: Sequence[str]) -> list[str]:
    """``"1-12"`` or ``"1,3,5"``: 1-based positions into ``names`` (natural order)."""
    out: list[str] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if not 1 <= first <= last <= len(names):
            raise SystemExit(f"range {part!r} is outside 1-{len(names)}")
        out.extend(names[first - 1 : last])
    return out


def scanpaths_of(ticks: Sequence[Tick]) -> list[Scanpath]:
    """Regroup interleaved ticks into scanpaths (subject, image), in order of first appearance."""
    rows: dict[tuple[str, str], list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for tick in ticks:
        for i, (subject, image, fix_index) in enumerate(tick.meta):
            rows[(subject, image)].append((fix_index, tick.u[i]))
    return [
        Scanpath(s, im, torch.stack([u for _, u in sorted(fx, key=lambda r: r[0])]))
        for (s, im), fx in rows.items()
    ]


def lockstep_ticks(paths: Sequence[Scanpath], width: int = 32) -> list[Tick]:
    """Frozen evaluation: ``width`` scanpaths side by side as streams, each from a reset."""
    ticks: list[Tick] = []
    for start in range(0, len(paths), width):
        group = paths[start : start + width]
        for t in range(max(len(p.u) for p in group)):
            live = [(k, p) for k, p in enumerate(group) if t < len(p.u)]
            ticks.append(
                Tick(
                    ids=[f"lane-{k}" for k, _ in live],
                    u=torch.stack([p.u[t] for _, p in live]),
                    reset=[t == 0] * len(live),
                    meta=[(p.subject, p.image, t) for _, p in live],
                    preview=torch.stack([p.v[t] for _, p in live]) if group[0].v is not None else None,
                )
            )
    return ticks


def preview_of(learner: StreamLearner, tick: Tick) -> torch.Tensor | None:
    """The tick's previews when the learner reads them (an untrained reference does not)."""
    return tick.preview if learner.cfg.preview_features else None


def with_previews(ticks: Sequence[Tick], paths: Sequence[Scanpath]) -> list[Tick]:
    """Interleaved ticks given each fixation's preview from its scanpath's ``v``."""
    v = {(p.subject, p.image): p.v for p in paths}
    return [
        dataclasses.replace(tick, preview=torch.stack([v[(s, im)][i] for s, im, i in tick.meta]))  # type: ignore[index]
        for tick in ticks
    ]


def attach_previews(
    learner: StreamLearner,
    ds: RecordedDataset,
    splits: dict[str, list[Scanpath]],
    *,
    saccade: bool,
    cache: Path | None,
    dims: int = 0,
    crop_factor: float = 2.0,
) -> dict[str, list[Scanpath]]:
    """The scanpaths of each split ("train" and the others) with ``v``: for each fixation t >= 1,
    the frozen trunk's features of its region as seen from fixation t-1 (``bench.peripheral``: a
    crop of ``crop_factor`` patch sizes, blurred to acuity at the saccade's eccentricity, given to
    the trunk at ``crop_factor`` x its input size), with ``dims`` > 0 projected on their top
    ``dims`` principal components fitted on the training previews (as ``bench.ceiling`` does: of
    1752 whitened directions most are noise), and with ``saccade`` the saccade's 15 features after
    them. The model whitens what it gets."""
    from bench.peripheral import positions, preview_features, saccade_features  # it imports this module

    ppd = ds.px_per_deg or 24.0
    crop, size = round(crop_factor * 50), round(crop_factor * learner.cfg.input_size)
    feats = {
        split: preview_features(
            learner, ds, paths, crop_px=crop, input_px=size, px_per_deg=ppd, scale=1.0, cache=cache
        )
        for split, paths in splits.items()
    }
    project = None
    if dims:
        train = torch.cat(feats["train"]).double()  # (P, M)
        mu = train.mean(0)
        _, vecs = torch.linalg.eigh(torch.cov((train - mu).T))
        top = vecs[:, -dims:]  # (M, dims), ascending eigenvalues: the last are the largest

        def project(f: torch.Tensor) -> torch.Tensor:
            return (f.double() - mu) @ top

    out: dict[str, list[Scanpath]] = {}
    for split, paths in splits.items():
        out[split] = []
        for p, f in zip(paths, feats[split], strict=True):
            cols = [(project(f) if project else f).to(p.u.dtype)]
            if saccade:
                cols.append(saccade_features(positions(ds, p), ppd).to(p.u.dtype))
            v = torch.cat(cols, 1)  # (T-1, F)
            out[split].append(Scanpath(p.subject, p.image, p.u, torch.cat([v.new_zeros(1, v.shape[1]), v])))
    return out


def shuffled(paths: Sequence[Scanpath], gen: torch.Generator) -> list[Scanpath]:
    """Each scanpath's fixations in a random order."""
    out = []
    for p in paths:  # a preview travels with its fixation: what the eye saw of the patch that lands
        order = torch.randperm(len(p.u), generator=gen)
        out.append(Scanpath(p.subject, p.image, p.u[order], p.v[order] if p.v is not None else None))
    return out


def iid_other_images(paths: Sequence[Scanpath], gen: torch.Generator) -> list[Scanpath]:
    """Every patch replaced by a fixated patch of a random other image of the set."""
    pool = torch.cat([p.u for p in paths])  # (F, M)
    pool_v = torch.cat([p.v for p in paths]) if paths[0].v is not None else None  # type: ignore[misc]
    image_of = [p.image for p in paths for _ in range(len(p.u))]
    out = []
    for p in paths:
        picks = []
        for _ in range(len(p.u)):
            while True:
                j = int(torch.randint(len(pool), (1,), generator=gen))
                if image_of[j] != p.image:
                    break
            picks.append(j)
        v = pool_v[picks] if pool_v is not None else None  # a preview travels with its patch
        out.append(Scanpath(p.subject, p.image, pool[picks], v))
    return out


def score(learner: StreamLearner, paths: Sequence[Scanpath]) -> list[dict[str, Any]]:
    """Frozen replay: one record per scored fixation (step >= 2) with its error, the repeat error, and
    two shrinkage baselines in the same loss, both fitted on these very fixations (so favoured):
    ``mean`` predicts the set's mean embedding, ``shrink`` the best blend a z_{t-1} + (1 - a) mean."""
    probe = _clone_frozen(learner)
    model = probe.model
    out, pairs = [], []
    last: dict[str, torch.Tensor] = {}  # lane -> z of its previous fixation
    with torch.no_grad():
        for tick in lockstep_ticks(paths):
            res = probe.tick_features(
                tick.ids, tick.u, tick.reset, learn=False, preview=preview_of(probe, tick)
            )
            slots = probe.states.slots(tick.ids)
            z = model.embed(probe.states.u[slots], probe.states.h[slots])  # (B, D)
            for i in range(len(tick.ids)):
                rec = _scored(tick, res, i)
                if rec is not None:
                    out.append(rec)
                    pairs.append((last[tick.ids[i]], z[i]))
                last[tick.ids[i]] = z[i]
        if pairs:
            z_prev = torch.stack([a for a, _ in pairs])  # (F, D)
            z_now = torch.stack([b for _, b in pairs])
            mean = z_now.mean(0, keepdim=True)
            metric = model.change_metric()
            a_mat = metric if metric is not None else torch.eye(z_now.shape[1], dtype=z_now.dtype)
            d, t = (z_prev - mean) @ a_mat, (z_now - mean) @ a_mat
            blend = float((d * t).sum() / (d * d).sum().clamp(min=1e-12))  # least squares in the metric
            for rec, e_mean, e_shrink in zip(
                out,
                model.distance(mean.expand_as(z_now), z_now).tolist(),
                model.distance(mean + blend * (z_prev - mean), z_now).tolist(),
                strict=True,
            ):
                rec["mean"], rec["shrink"], rec["blend"] = e_mean, e_shrink, blend
    return out


def online(learner: StreamLearner, ticks: Sequence[Tick]) -> list[dict[str, Any]]:
    """Prequential records of a learning run: each fixation scored before it is learned from."""
    out = []
    for tick in ticks:
        res = learner.tick_features(
            tick.ids, tick.u, tick.reset, learn=True, preview=preview_of(learner, tick)
        )
        out.extend(rec for i in range(len(tick.ids)) if (rec := _scored(tick, res, i)) is not None)
    return out


def _scored(tick: Tick, res: TickOutput, i: int) -> dict[str, Any] | None:
    """The record of fixation i of a tick, or None where nothing was predicted (after a reset)."""
    if math.isnan(float(res.error[i])):
        return None
    subject, image, _ = tick.meta[i]
    return {
        "subject": subject,
        "image": image,
        "step": int(res.step[i]),
        "error": float(res.error[i]),
        "repeat": float(res.repeat_error[i]),
        "skipped": bool(res.skipped[i]),
    }


def by_image(records: Sequence[dict[str, Any]], value: Any) -> tuple[float, float, int]:
    """Mean of ``value(record)`` and its standard error over images: (mean, sem, n images)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in records:
        groups[r["image"]].append(value(r))
    means = np.array([np.mean(v) for v in groups.values()])
    sem = float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else math.nan
    return float(means.mean()), sem, len(means)


def summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Model and repeat errors, their difference and skill, with standard errors over images."""
    err = by_image(records, lambda r: r["error"])
    rep = by_image(records, lambda r: r["repeat"])
    diff = by_image(records, lambda r: r["error"] - r["repeat"])
    out = {
        "fixations": len(records),
        "error": err[:2],
        "repeat": rep[:2],
        "model_minus_repeat": diff[:2],
        "skill": 1 - err[0] / rep[0],
        "images": err[2],
    }
    if records and "shrink" in records[0]:  # frozen scoring: the shrinkage baselines too
        out["mean"] = by_image(records, lambda r: r["mean"])[:2]
        out["shrink"] = by_image(records, lambda r: r["shrink"])[:2]
        out["shrink_blend"] = records[0]["blend"]
        out["model_minus_shrink"] = by_image(records, lambda r: r["error"] - r["shrink"])[:2]
        out["skill_vs_shrink"] = 1 - err[0] / out["shrink"][0]
    return out


def steps(
    records: Sequence[dict[str, Any]], key: str = "error", max_step: int = 10
) -> dict[int, list[float]]:
    """Mean and standard error over images of ``key`` at each step (the last bin: ``max_step`` or later)."""
    out = {}
    for s in range(2, max_step + 1):
        rows = [r for r in records if min(r["step"], max_step) == s]
        if rows:
            out[s] = list(by_image(rows, lambda r: r[key])[:2])
    return out


def fall(by_step: dict[int, list[float]]) -> float:
    """How much the error falls from the second fixation to the last bin."""
    return by_step[2][0] - by_step[max(by_step)][0]


# --- retrieval ------------------------------------------------------------------------------------
@dataclass
class RetrievalSet:
    """Scored fixations with 9 counterfactual next patches each."""

    path: list[int]  # (R,) index into the scanpaths
    step: list[int]  # (R,) 0-based position t of the true next fixation (t >= 1)
    distractors: torch.Tensor  # (R, 9, M) raw trunk features


def retrieval_set(
    learner: StreamLearner,
    ds: RecordedDataset,
    paths: Sequence[Scanpath],
    *,
    n: int,
    same_image: int,
    patch_px: int,
    gen: torch.Generator,
) -> RetrievalSet:
    """Pick ``n`` scored fixations. For each, cut ``same_image`` patches of its image where someone
    (any subject) fixated it, at least one patch from the true next fixation and from the current
    one (uniform positions when too few such fixations exist), and take the rest from fixations of
    other images: every candidate is a place people look, so a prediction of "a typical fixated
    patch" cannot single out the true one."""
    fix = {(f.subject, f.image, f.fix_index): f for p in paths for f in ds.scanpath(p.image, p.subject)}
    candidates = [(k, t) for k, p in enumerate(paths) for t in range(1, len(p.u))]
    order = torch.randperm(len(candidates), generator=gen)[:n].tolist()
    chosen = [candidates[i] for i in order]
    pool = [(k, t) for k, p in enumerate(paths) for t in range(len(p.u))]
    fixated: dict[str, list[tuple[float, float]]] = {}
    patches, others = [], []
    for k, t in chosen:
        p = paths[k]
        true, now = fix[(p.subject, p.image, t)], fix[(p.subject, p.image, t - 1)]
        img = ds.load_image(p.image)
        h, w = img.shape[:2]
        if p.image not in fixated:
            fixated[p.image] = [(f.x, f.y) for s in ds.subjects for f in ds.scanpath(p.image, s)]

        def far(x: float, y: float, true: Any = true, now: Any = now) -> bool:
            return min(math.hypot(x - true.x, y - true.y), math.hypot(x - now.x, y - now.y)) >= patch_px

        spots = [xy for xy in fixated[p.image] if far(*xy)]
        drawn = 0
        while drawn < same_image:
            if len(spots) >= same_image:
                x, y = spots[int(torch.randint(len(spots), (1,), generator=gen))]
            else:
                x, y = (torch.rand(2, generator=gen) * torch.tensor([w, h])).tolist()
                if not far(x, y):
                    continue
            patches.append(cut_patch(img, x, y, patch_px))
            drawn += 1
        picks = []
        while len(picks) < 9 - same_image:
            kk, tt = pool[int(torch.randint(len(pool), (1,), generator=gen))]
            if paths[kk].image != p.image:
                picks.append(paths[kk].u[tt])
        others.append(torch.stack(picks) if picks else paths[k].u[:0])
    with torch.no_grad():
        feats = []
        for start in range(0, len(patches), 64):
            x = preprocess(patches[start : start + 64], learner.cfg.input_size, device=learner.device)
            feats.append(learner.model.encode(x).cpu())
        same = torch.cat(feats).view(len(chosen), same_image, -1) if patches else None
    rows = [torch.cat([same[i], others[i]]) if same is not None else others[i] for i in range(len(chosen))]
    return RetrievalSet([k for k, _ in chosen], [t for _, t in chosen], torch.stack(rows))


@torch.no_grad()
def retrieval(learner: StreamLearner, paths: Sequence[Scanpath], rs: RetrievalSet) -> dict[str, float]:
    """Top-1 accuracy of the true next embedding among 10, for the model's prediction and for repeat.

    Candidates are ranked by the loss ``D(prediction, candidate)``; a hit needs the true one strictly
    closest (a tie, or a NaN, is a miss: a collapsed embedding scores 0, not 100 %). The model's
    state before the true fixation is replayed from the scanpath's start with frozen weights.
    Standard errors are over images, and the model's lead over repeat is a paired difference.
    """
    model = learner.model
    rows = []
    for k, t, dis in zip(rs.path, rs.step, rs.distractors, strict=True):
        u = model.normalize(paths[k].u[: t + 1].to(learner.dtype), update=False)  # (t+1, M)
        h = c = model.zero_state(1)
        for i in range(t):
            h, c, _ = model.rgc.step(u[i : i + 1], h, c)
        z_prev = model.embed(u[t - 1 : t], h)  # (1, D)
        cands = torch.cat([u[t : t + 1], model.normalize(dis.to(learner.dtype), update=False)])  # (10, M)
        h_next, _, _ = model.rgc.step(cands, h.expand(10, -1), c.expand(10, -1))
        z = model.embed(cands, h_next)  # (10, D): the true one first
        v = paths[k].v
        if v is not None and model.cfg.preview_features:  # the true fixation's preview, seen before it
            pred_model = model.predictor(
                z_prev, model.normalize_preview(v[t : t + 1].to(z.dtype), update=False)
            )
        else:
            pred_model = model.G(z_prev)
        hit = []
        for pred in (pred_model, z_prev):
            losses = model.distance(pred.expand(10, -1), z)
            hit.append(float(bool(losses[0] < losses[1:].min())))
        rows.append({"image": paths[k].image, "model": hit[0], "repeat": hit[1]})
    out: dict[str, float] = {"n": len(rows)}
    for key, value in (
        ("model", lambda r: r["model"]),
        ("repeat", lambda r: r["repeat"]),
        ("model_minus_repeat", lambda r: r["model"] - r["repeat"]),
    ):
        mean, sem, _ = by_image(rows, value)
        out[key], out[f"{key}_sem"] = mean, sem
    return out


def dimensionality(learner: StreamLearner, paths: Sequence[Scanpath], window: int = 4000) -> float:
    """Participation ratio of the embedding covariance over held-out fixations (frozen replay)."""
    probe = _clone_frozen(learner)
    zs = []
    with torch.no_grad():
        for tick in lockstep_ticks(paths):
            probe.tick_features(tick.ids, tick.u, tick.reset, learn=False, preview=preview_of(probe, tick))
            slots = probe.states.slots(tick.ids)
            zs.append(probe.model.embed(probe.states.u[slots], probe.states.h[slots]).double())
    return participation_ratio(covariance_spectrum(torch.cat(zs)[-window:]))


# --- the run --------------------------------------------------------------------------------------
def cached_features(
    learner: StreamLearner,
    ds: RecordedDataset,
    images: Sequence[str],
    subjects: Sequence[str],
    patch_px: int,
    cache: Path | None,
) -> list[Tick]:
    """``feature_ticks``, cached on disk by trunk, input size, images, subjects and patch size."""
    cfg = learner.cfg
    key = json.dumps([cfg.trunk, cfg.trunk_weights, cfg.input_size, list(images), list(subjects), patch_px])
    path = cache / f"features-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt" if cache else None
    if path is not None and path.is_file():
        return [Tick(**t) for t in torch.load(path, weights_only=False)]
    ticks = feature_ticks(learner, ds, images=images, subjects=subjects, patch_px=patch_px)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save([t.__dict__ for t in ticks], path)
    return ticks


def run_seed(
    cfg: ModelConfig,
    train: Sequence[Tick],
    test: Sequence[Tick],
    test_paths: Sequence[Scanpath],
    rs: RetrievalSet,
    seed: int,
    epochs: int = 1,
) -> dict[str, Any]:
    """Every measure for one seed: train online (``epochs`` passes over the training ticks, the
    records of every pass joined: "training, second half" is then the later passes), then the
    controls on the held-out split."""
    cfg = cfg.replace(seed=seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    learner = RFPLearner(cfg)
    t0 = time.perf_counter()
    train_records = [rec for _ in range(epochs) for rec in online(learner, train)]
    t_train = time.perf_counter() - t0
    # with a preview: G starts at the identity whatever Q is, and Q is drawn after every other weight,
    # so the untrained model is the same without the preview (and BPTT, which runs it, reads none)
    untrained, _ = untrained_reference(cfg.replace(preview_features=0), train, 1, "cpu")
    frozen = _clone_frozen(learner)
    transfer = score(frozen, test_paths)
    res: dict[str, Any] = {
        "seed": seed,
        "seconds_training": t_train,
        "train_fixations": len(train_records),
        "train_skipped": sum(r["skipped"] for r in train_records),
        "train_second_half": summary(train_records[len(train_records) // 2 :]),
        "transfer": summary(transfer),
        "transfer_by_step": steps(transfer),
        "transfer_repeat_by_step": steps(transfer, "repeat"),
        "untrained": summary(score(untrained, test_paths)),
    }
    shuffled_records = score(frozen, shuffled(test_paths, gen))
    iid_records = score(frozen, iid_other_images(test_paths, gen))
    res["shuffled"] = summary(shuffled_records)
    res["shuffled_by_step"] = steps(shuffled_records)
    res["iid"] = summary(iid_records)
    res["iid_by_step"] = steps(iid_records)
    res["fall"] = {
        "model": fall(res["transfer_by_step"]),
        "repeat": fall(res["transfer_repeat_by_step"]),
        "shuffled": fall(res["shuffled_by_step"]),
        "iid": fall(res["iid_by_step"]),
    }
    res["retrieval"] = retrieval(learner, test_paths, rs)
    res["retrieval_untrained"] = retrieval(untrained, test_paths, rs)
    res["effective_dim"] = dimensionality(learner, test_paths)
    res["effective_dim_untrained"] = dimensionality(untrained, test_paths)
    # keep learning on the held-out people and images (the service's mode); its second half
    held_out = online(learner, test)
    res["online_held_out_second_half"] = summary(held_out[len(held_out) // 2 :])
    res["learner"] = learner
    return res


def run(
    dataset: str | Path,
    cfg: ModelConfig,
    *,
    train_subjects: str,
    train_images: str,
    test_subjects: str,
    test_images: str,
    seeds: Sequence[int] = (0, 1),
    retrieval_n: int = 1000,
    same_image: int = 5,
    patch_px: int = 50,
    cache: Path | None = None,
    preview: str = "none",
    preview_dims: int = 0,
    epochs: int = 1,
) -> dict[str, Any]:
    """``preview``: ``none``, ``preview`` (each fixation's peripheral preview, ``attach_previews``)
    or ``saccade+preview``; the model then reads it (``cfg.preview_features`` is set to its width);
    ``preview_dims`` > 0: the preview's top principal components only."""
    ds = RecordedDataset.open(dataset)
    tr_s, tr_i, te_s, te_i = held_out_split(ds, train_subjects, train_images, test_subjects, test_images)
    feature_learner = RFPLearner(cfg)
    t0 = time.perf_counter()
    train = cached_features(feature_learner, ds, tr_i, tr_s, patch_px, cache)
    test = cached_features(feature_learner, ds, te_i, te_s, patch_px, cache)
    test_paths = scanpaths_of(test)
    if preview != "none":
        got = attach_previews(
            feature_learner,
            ds,
            {"train": scanpaths_of(train), "test": test_paths},
            saccade=preview == "saccade+preview",
            cache=cache,
            dims=preview_dims,
        )
        test_paths = got["test"]
        train, test = with_previews(train, got["train"]), with_previews(test, test_paths)
        assert test_paths[0].v is not None
        cfg = cfg.replace(preview_features=test_paths[0].v.shape[1])
    rs = retrieval_set(
        feature_learner,
        ds,
        test_paths,
        n=retrieval_n,
        same_image=same_image,
        patch_px=patch_px,
        gen=torch.Generator().manual_seed(7),
    )
    t_features = time.perf_counter() - t0
    per_seed = [run_seed(cfg, train, test, test_paths, rs, s, epochs) for s in seeds]
    return {
        "config": cfg.to_dict(),
        "split": {
            "train_subjects": train_subjects,
            "train_images": train_images,
            "test_subjects": test_subjects,
            "test_images": test_images,
        },
        "retrieval_candidates": {"same_image": same_image, "other_images": 9 - same_image},
        "preview": preview,
        "preview_dims": preview_dims,
        "epochs": epochs,
        "seconds_features": t_features,
        "seeds": per_seed,
    }


def format_table(res: dict[str, Any]) -> str:
    """The report: one column per seed."""

    def pm(v: Sequence[float]) -> str:
        return f"{v[0]:.4f} ± {v[1]:.4f}"

    rows: list[tuple[str, Any]] = [
        ("transfer: model error", lambda s: pm(s["transfer"]["error"])),
        ("transfer: repeat error", lambda s: pm(s["transfer"]["repeat"])),
        ("transfer: model - repeat", lambda s: pm(s["transfer"]["model_minus_repeat"])),
        ("transfer: skill", lambda s: f"{s['transfer']['skill']:+.3f}"),
        ("transfer: oracle mean baseline error", lambda s: pm(s["transfer"]["mean"])),
        ("transfer: oracle shrink baseline error", lambda s: pm(s["transfer"]["shrink"])),
        ("transfer: model - shrink", lambda s: pm(s["transfer"]["model_minus_shrink"])),
        ("transfer: skill vs shrink", lambda s: f"{s['transfer']['skill_vs_shrink']:+.3f}"),
        (
            "online held-out 2nd half: model - repeat",
            lambda s: pm(s["online_held_out_second_half"]["model_minus_repeat"]),
        ),
        ("online held-out 2nd half: skill", lambda s: f"{s['online_held_out_second_half']['skill']:+.3f}"),
        ("training 2nd half: skill", lambda s: f"{s['train_second_half']['skill']:+.3f}"),
        ("shuffled scanpaths: skill", lambda s: f"{s['shuffled']['skill']:+.3f}"),
        ("i.i.d. other-image patches: skill", lambda s: f"{s['iid']['skill']:+.3f}"),
        ("untrained: error", lambda s: pm(s["untrained"]["error"])),
        (
            "retrieval top-1: model",
            lambda s: f"{s['retrieval']['model']:.3f} ± {s['retrieval']['model_sem']:.3f}",
        ),
        (
            "retrieval top-1: repeat",
            lambda s: f"{s['retrieval']['repeat']:.3f} ± {s['retrieval']['repeat_sem']:.3f}",
        ),
        (
            "retrieval: model - repeat (paired)",
            lambda s: (
                f"{s['retrieval']['model_minus_repeat']:+.3f} "
                f"± {s['retrieval']['model_minus_repeat_sem']:.3f}"
            ),
        ),
        ("retrieval top-1: untrained", lambda s: f"{s['retrieval_untrained']['model']:.3f}"),
        ("fall step 2 -> 10+: model", lambda s: f"{s['fall']['model']:.4f}"),
        ("fall: shuffled", lambda s: f"{s['fall']['shuffled']:.4f}"),
        ("fall: i.i.d. other images", lambda s: f"{s['fall']['iid']:.4f}"),
        ("fall: repeat", lambda s: f"{s['fall']['repeat']:.4f}"),
        ("effective dim (of D)", lambda s: f"{s['effective_dim']:.1f}"),
        ("effective dim untrained", lambda s: f"{s['effective_dim_untrained']:.1f}"),
        ("skipped training fixations", lambda s: f"{s['train_skipped']} of {s['train_fixations']}"),
    ]
    seeds = res["seeds"]
    lines = ["| measure | " + " | ".join(f"seed {s['seed']}" for s in seeds) + " |"]
    lines.append("|---|" + "---|" * len(seeds))
    for name, get in rows:
        lines.append(f"| {name} | " + " | ".join(get(s) for s in seeds) + " |")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    """Error by step within a scanpath: model, repeat, shuffled and i.i.d. (transfer, first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["seeds"][0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("transfer_by_step", "model"),
        ("transfer_repeat_by_step", "repeat the current embedding"),
        ("shuffled_by_step", "model, scanpaths shuffled"),
        ("iid_by_step", "model, patches from other images"),
    ):
        data = {int(k): v for k, v in s[key].items()}  # JSON gives the steps back as strings
        xs = sorted(data)
        ys = np.array([data[x][0] for x in xs])
        es = np.array([data[x][1] for x in xs])
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=2, label=label)
    ax.set_xlabel("fixation within the scanpath (last: 10 or later)")
    ax.set_ylabel(f"prediction error ({res['config']['loss']})")
    ax.set_title("held-out people and images (transfer), ± s.e. over images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    split_arguments(ap, train_images="1-350", test_images="351-700")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--retrieval", type=int, default=1000, help="scored fixations ranked in retrieval")
    ap.add_argument("--same-image", type=int, default=5, help="of the 9 distractors, from the same image")
    ap.add_argument("--trunk", default=ModelConfig.trunk)
    ap.add_argument("--trunk-weights", default=None)
    ap.add_argument("--embed-from", default=ModelConfig.embed_from, choices=["context", "state"])
    ap.add_argument("--lr", type=float, default=ModelConfig.lr)
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=VALUE", help="other ModelConfig fields (ablations)"
    )
    ap.add_argument(
        "--preview",
        default="none",
        choices=["none", "preview", "saccade+preview"],
        help="the model's predictor also reads each fixation's peripheral preview (blurred to acuity, "
        "bench.peripheral), and with saccade+preview the saccade's features (ModelConfig.preview_features)",
    )
    ap.add_argument(
        "--preview-dims", type=int, default=0, help="the preview's top principal components (0: all)"
    )
    ap.add_argument("--epochs", type=int, default=1, help="passes over the training split")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--cache", type=Path, default=Path("runs/cache"), help="trunk feature cache folder")
    ap.add_argument("--out-dir", type=Path, default=None, help="write controls.json, .md and the figure")
    ap.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="no run: join the seeds of earlier runs' controls.json (same split) into one report",
    )
    args = ap.parse_args(argv)
    if args.combine:
        runs = [json.loads(p.read_text()) for p in args.combine]
        if any(r["split"] != runs[0]["split"] or r["config"] != runs[0]["config"] for r in runs):
            raise SystemExit("--combine: the runs differ in split or configuration")
        res = {
            **runs[0],
            "seeds": [s for r in runs for s in r["seeds"]],
            "combined": [str(p) for p in args.combine],
        }
        _report(res, args.out_dir)
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs < 1:
        raise SystemExit(f"--epochs must be at least 1, got {args.epochs}")
    extra = config_overrides(args.set)
    cfg = ModelConfig(
        trunk=args.trunk, trunk_weights=args.trunk_weights, embed_from=args.embed_from, lr=args.lr, **extra
    )
    t0 = time.perf_counter()
    res = run(
        args.dataset,
        cfg,
        train_subjects=args.train_subjects,
        train_images=args.train_images,
        test_subjects=args.test_subjects,
        test_images=args.test_images,
        seeds=args.seeds,
        retrieval_n=args.retrieval,
        same_image=args.same_image,
        cache=args.cache,
        preview=args.preview,
        preview_dims=args.preview_dims,
        epochs=args.epochs,
    )
    for s in res["seeds"]:
        s.pop("learner")
    res["seconds_total"] = time.perf_counter() - t0
    _report(res, args.out_dir)


def _report(res: dict[str, Any], out_dir: Path | None) -> None:
    """Print the table; with ``out_dir``, also write controls.json, controls.md and the figure."""
    table = format_table(res)
    print(table)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "controls.json").write_text(json.dumps(res, indent=2))
        (out_dir / "controls.md").write_text(table + "\n")
        plot(res, out_dir / "controls_by_step.png")


if __name__ == "__main__":
    main()
