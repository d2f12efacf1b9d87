"""Drawing the paper's Fig. 3 and Fig. 4 from the numbers ``bench.paper_figures.run`` measured.

Every function takes the result dict (or the same dict read back from ``paper_figures.json``, whose
step keys are strings) and draws with matplotlib's object API on the Agg canvas (no pyplot state, no
display). The titles name the dataset, the split and the held-out sizes, from the result itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("untrained", "rfp", "bptt")
COLORS = {"untrained": "0.45", "rfp": "tab:blue", "bptt": "tab:orange"}
DODGE = {"untrained": -0.1, "rfp": 0.0, "bptt": 0.1}


def compact_ids(ids: Sequence[str]) -> str:
    """``['1', '2', '3', '7']`` -> ``'1-3,7'`` (other ids listed as they are)."""
    if not all(s.isdigit() for s in ids):
        return ",".join(ids)
    nums, parts = sorted(int(s) for s in ids), []
    start = prev = nums[0]
    for n in [*nums[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(f"{start}-{prev}" if prev > start else str(start))
        if n is not None:
            start = prev = n
    return ",".join(parts)


def describe_split(res: dict[str, Any]) -> str:
    """One line naming the dataset, the split and the held-out sizes (for figure titles)."""
    sp, d = res["split"], res["dataset"]
    n_tr = len(sp["train_images"])
    return (
        f"{d['name']}, held out: subjects {compact_ids(sp['test_subjects'])} x images {n_tr + 1}-"
        f"{n_tr + len(sp['test_images'])} ({d['test_fixations']} fixations, "
        f"{d['test_scanpaths']} scanpaths); "
        f"trained on subjects {compact_ids(sp['train_subjects'])} x images 1-{n_tr}, {res['epochs']} epoch(s)"
    )


def _bptt_label(res: dict[str, Any]) -> str:
    window = res["bptt_window"]
    return "BPTT (full history)" if window is None else f"BPTT (window {window})"


def plot_fig4(res: dict[str, Any], path: Path) -> None:
    """(a) held-out error by step within a scanpath; (b) prequential training error."""
    from matplotlib.figure import Figure

    fig4, max_step = res["fig4"], res["fig4"]["max_step"]
    labels = {"untrained": "untrained", "rfp": "RFP (online)", "bptt": _bptt_label(res)}
    fig = Figure(figsize=(13, 5), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=(3, 2))
    for m in MODELS:
        for key, style, extra in (("by_step", "-o", ""), ("repeat_by_step", "--", ", repeat z_t")):
            if key == "repeat_by_step" and m == "untrained":
                continue
            pts = sorted((int(s), v) for s, v in fig4[key][m].items() if int(s) >= 2)
            steps = [s + DODGE[m] for s, _ in pts]  # side by side, so overlapping error bars stay visible
            mean, sem = [v["mean"] for _, v in pts], [v["sem"] for _, v in pts]
            ax.errorbar(
                steps, mean, yerr=sem, fmt=style, color=COLORS[m], capsize=3, ms=4, label=labels[m] + extra
            )
    ax.set_xticks(range(2, max_step + 1), [*map(str, range(2, max_step)), f"{max_step}+"])
    ax.set_xlabel("time step within the scanpath (fixation number after the reset)")
    ax.set_ylabel(
        "prediction error D = 1 - cos" if res["config"]["loss"] == "cosine" else "prediction error D"
    )
    ax.set_title("(a) held-out error by step, mean ± s.e.m. over fixations", fontsize=10)
    ax.legend(fontsize=8)
    for m in ("rfp", "bptt"):
        curve = res["fig4"]["learning_curve"][m]
        ax2.plot(
            [c["fixations"] for c in curve],
            [c["mean"] for c in curve],
            "-o",
            ms=3,
            color=COLORS[m],
            label=labels[m],
        )
    ax2.set_xlabel("training fixations scored (all epochs)")
    ax2.set_ylabel("prequential error (scored before learning)")
    ax2.set_title(f"(b) training, {res['updates_applied']['rfp']} updates each", fontsize=10)
    ax2.legend(fontsize=8)
    fig.suptitle("Fig. 4 reproduced: " + describe_split(res), fontsize=9)
    fig.savefig(path, dpi=110)


def plot_fig3(res: dict[str, Any], path: Path) -> None:
    """(a) PCA trajectories of z_t after RFP learning; (b) normalised covariance spectra."""
    from matplotlib.figure import Figure

    pca, d = res["fig3"]["pca"], res["embed_dim"]
    fig = Figure(figsize=(12, 5), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    for i, p in enumerate(pca["paths"]):
        xy = np.asarray(p["xy"])
        line = ax.plot(
            xy[:, 0], xy[:, 1], "-o", ms=3, color=f"C{i}", label=f"subject {p['subject']}, {p['image']}"
        )
        ax.plot(xy[0, 0], xy[0, 1], "*", ms=14, color=line[0].get_color(), mec="k")
    ev = pca["explained_variance_ratio"]
    ax.set_xlabel(f"PC1 ({100 * ev[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * ev[1]:.1f}% of variance)" if len(ev) > 1 else "PC2")
    ax.set_title("(a) z_t along held-out scanpaths after RFP learning (star: first fixation)", fontsize=10)
    ax.legend(fontsize=8)
    labels = {"untrained": "before learning", "rfp": "after RFP", "bptt": "after " + _bptt_label(res)}
    for m in MODELS:
        lam = np.asarray(res["fig3"]["spectrum"][m])
        lam = lam / max(lam.sum(), 1e-300)
        pr = res["summary"][m]["effective_dim"]
        ax2.semilogy(
            np.arange(1, len(lam) + 1),
            np.clip(lam, 1e-12, None),
            color=COLORS[m],
            label=f"{labels[m]}: effective dim {pr:.1f} of {d}",
        )
    ax2.set_xlabel("eigenvalue rank")
    ax2.set_ylabel("eigenvalue / sum (held-out embedding covariance)")
    ax2.set_title("(b) spectrum; effective dim = participation ratio", fontsize=10)
    ax2.legend(fontsize=8)
    fig.suptitle("Fig. 3 reproduced: " + describe_split(res), fontsize=9)
    fig.savefig(path, dpi=110)


def _num(x: float | None, width: int, digits: int) -> str:
    """A right-aligned number; ``nan`` for a missing (null in JSON) or non-finite one."""
    return f"{x:>{width}.{digits}f}" if x is not None and math.isfinite(x) else f"{'nan':>{width}}"


def format_summary(res: dict[str, Any]) -> str:
    """The summary table (held-out error, repeat baseline, effective dimensionality) as text."""
    fig4, top = res["fig4"], res["fig4"]["max_step"]
    rows = [
        describe_split(res),
        f"{'model':<26}{'error':>8}{'step 2':>8}{f'step {top}+':>9}{'repeat z_t':>11}{'eff. dim':>10}",
    ]
    labels = {"untrained": "untrained", "rfp": "RFP (online)", "bptt": _bptt_label(res)}
    for m in MODELS:
        s, steps = res["summary"][m], {int(k): v for k, v in fig4["by_step"][m].items()}
        e2, etop = (steps[k]["mean"] if k in steps else None for k in (2, top))
        rows.append(
            f"{labels[m]:<26}{_num(s['test_error'], 8, 4)}{_num(e2, 8, 4)}{_num(etop, 9, 4)}"
            f"{_num(s['repeat_baseline_error'], 11, 4)}{_num(s['effective_dim'], 7, 1)}/{res['embed_dim']}"
        )
    rows.append(
        "(repeat z_t: error of predicting the next embedding as the current one, in that model's embedding;"
    )
    rows.append(" the paper reports an effective dimensionality of about 50 of 120 after learning)")
    sec = res["seconds"]
    rows.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in sec.items()))
    return "\n".join(rows)
