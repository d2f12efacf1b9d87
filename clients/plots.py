"""Figures of a replay: prediction error against fixations seen, and against the step within a scanpath.

Drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display needed), so they
can be made from any thread, on a headless machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clients.replay import ReplayRecord

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


def plot_replay(records: Sequence[ReplayRecord], out_dir: str | Path, title: str = "") -> list[Path]:
    """Save the two figures as PNG files in ``out_dir`` (created if needed); returns their paths.

    - ``error_vs_fixations.png``: each scored fixation's error (dots) and its running mean over a
      window of about 2% of the fixations, against the number of fixations the server has seen;
    - ``error_by_step.png``: mean error (± 95% interval) at each step within a scanpath, with the
      number of fixations per step.

    Raises ``ValueError`` when no record has an error (nothing was scored).
    """
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen = np.array([i + 1 for i, r in enumerate(records) if r.error is not None], dtype=np.int64)
    errors = np.array([r.error for r in records if r.error is not None], dtype=np.float64)
    if errors.size == 0:
        raise ValueError(
            "no fixation was scored (each stream needs 2+ fixations after a reset); nothing to plot"
        )
    window = max(10, errors.size // 50)
    suffix = f" ({title})" if title else ""

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(seen, errors, ".", ms=2, alpha=0.25, color="0.5", label="one fixation")
    ax.plot(seen, running_mean(errors, window), color="C0", lw=2, label=f"running mean ({window} fixations)")
    ax.set_xlabel("fixations seen by the server")
    ax.set_ylabel("prediction error")
    ax.set_title(f"Error against fixations seen{suffix}")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    first = out / ERROR_VS_FIXATIONS_PNG
    fig.savefig(first, dpi=120)

    steps: dict[int, list[float]] = {}
    for r in records:
        if r.error is not None:
            steps.setdefault(r.step, []).append(r.error)
    xs = np.array(sorted(steps))
    means = np.array([np.mean(steps[s]) for s in xs])
    half = np.array([1.96 * np.std(steps[s], ddof=1) / np.sqrt(len(steps[s])) if len(steps[s]) > 1 else 0.0
                     for s in xs])  # fmt: skip
    counts = np.array([len(steps[s]) for s in xs])
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    twin = ax.twinx()
    twin.bar(xs, counts, color="0.85", width=0.8, label="fixations")
    twin.set_ylabel("fixations at this step")
    ax.set_zorder(twin.get_zorder() + 1)  # the error line over the count bars
    ax.patch.set_visible(False)
    ax.errorbar(xs, means, yerr=half, fmt="o-", color="C1", capsize=3, label="mean error ± 95% CI")
    ax.set_xlabel("step within the scanpath (1 = first fixation on the image, never scored)")
    ax.set_ylabel("prediction error")
    ax.set_title(f"Error by time step within a scanpath{suffix}")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    second = out / ERROR_BY_STEP_PNG
    fig.savefig(second, dpi=120)
    return [first, second]
