"""Figures of a replay: prediction error against fixations seen, and against the step within a scanpath,
each beside the error of the baseline that repeats the current embedding as the prediction.

Drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display needed), so they
can be made from any thread, on a headless machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clients.replay_summary import ReplayRecord, error_meaning

__all__ = ["ERROR_BY_STEP_PNG", "ERROR_VS_FIXATIONS_PNG", "plot_replay", "running_mean"]

ERROR_VS_FIXATIONS_PNG = "error_vs_fixations.png"
ERROR_BY_STEP_PNG = "error_by_step.png"


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each value and the ``window - 1`` before it (fewer at the start), shape (len(values),).

    >>> running_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist()
    [1.0, 2.0, 4.0, 6.0]
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    csum = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])  # (T + 1,)
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    means: np.ndarray = (csum[idx] - csum[lo]) / (idx - lo)  # (T,)
    return means


def plot_replay(
    records: Sequence[ReplayRecord], out_dir: str | Path, title: str = "", loss: str | None = None
) -> list[Path]:
    """Save the two figures as PNG files in ``out_dir`` (created if needed); returns their paths.

    - ``error_vs_fixations.png``: each scored fixation's error (dots) and its running mean over a
      window of about 2% of the fixations, against the number of fixations the server has seen,
      with the repeat baseline's running mean over the same window;
    - ``error_by_step.png``: mean error (± 95% interval) at each step within a scanpath, the repeat
      baseline's (± 95%) beside it, and the number of fixations per step.

    ``loss`` is the server's loss (``ReplaySummary.loss``): each figure says under it what the error
    is (:func:`clients.replay_summary.error_meaning`). The repeat baseline predicts the next embedding
    to be the current one; where the model's curve
    lies below it, the model beats repeating. Records without ``repeat_error`` (a server before it
    was reported) draw no baseline. Raises ``ValueError`` when no record has an error (nothing was
    scored).
    """
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scored = [(i + 1, r) for i, r in enumerate(records) if r.error is not None and r.step is not None]
    seen = np.array([i for i, _ in scored], dtype=np.int64)
    errors = np.array([r.error for _, r in scored], dtype=np.float64)
    if errors.size == 0:
        raise ValueError(
            "no fixation was scored (each stream needs 2+ fixations after a reset); nothing to plot"
        )
    with_repeat = [(i, r.repeat_error) for i, r in scored if r.repeat_error is not None]
    repeat_seen = np.array([i for i, _ in with_repeat], dtype=np.int64)
    repeats = np.array([v for _, v in with_repeat], dtype=np.float64)
    window = max(10, errors.size // 50)
    suffix = f" ({title})" if title else ""
    meaning = error_meaning(loss)

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(seen, errors, ".", ms=2, alpha=0.25, color="0.5", label="one fixation")
    ax.plot(seen, running_mean(errors, window), color="C0", lw=2, label=f"running mean ({window} fixations)")
    if repeats.size:
        ax.plot(repeat_seen, running_mean(repeats, window), color="C3", lw=1.5, ls="--",
                label="repeat current embedding, running mean")  # fmt: skip
    ax.set_xlabel("fixations seen by the server")
    ax.set_ylabel("prediction error")
    fig.supxlabel(f"error: {meaning}", fontsize="small", color="0.3")
    ax.set_title(f"Error against fixations seen{suffix}")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    first = out / ERROR_VS_FIXATIONS_PNG
    fig.savefig(first, dpi=120)

    steps: dict[int, list[float]] = {}
    repeat_steps: dict[int, list[float]] = {}
    for (_, r), error in zip(scored, errors.tolist(), strict=True):
        assert r.step is not None  # scored records have one
        steps.setdefault(r.step, []).append(error)
        if r.repeat_error is not None:
            repeat_steps.setdefault(r.step, []).append(r.repeat_error)
    xs = np.array(sorted(steps))
    means, half = _mean_ci([steps[s] for s in xs])
    counts = np.array([len(steps[s]) for s in xs])
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    twin = ax.twinx()
    twin.bar(xs, counts, color="0.85", width=0.8, label="fixations")
    twin.set_ylabel("fixations at this step")
    ax.set_zorder(twin.get_zorder() + 1)  # the error lines over the count bars
    ax.patch.set_visible(False)
    ax.errorbar(xs, means, yerr=half, fmt="o-", color="C1", capsize=3, label="model: mean error ± 95% CI")
    if repeat_steps:
        rxs = np.array(sorted(repeat_steps))
        rmeans, rhalf = _mean_ci([repeat_steps[s] for s in rxs])
        # shifted a little to the right, so that the two error bars of a step do not hide each other
        ax.errorbar(rxs + 0.12, rmeans, yerr=rhalf, fmt="s--", color="C3", capsize=3, ms=4,
                    label="repeat current embedding ± 95% CI")  # fmt: skip
    ax.set_xlabel("step within the scanpath (1 = first fixation on the image, never scored)")
    ax.set_ylabel("prediction error")
    fig.supxlabel(f"error: {meaning}", fontsize="small", color="0.3")
    ax.set_title(f"Error by time step within a scanpath{suffix}")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    second = out / ERROR_BY_STEP_PNG
    fig.savefig(second, dpi=120)
    return [first, second]


def _mean_ci(groups: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Each group's mean and the half-width of its 95% interval (0 for a single value): (G,), (G,)."""
    means = np.array([np.mean(g) for g in groups])
    half = np.array([1.96 * np.std(g, ddof=1) / np.sqrt(len(g)) if len(g) > 1 else 0.0 for g in groups])
    return means, half
