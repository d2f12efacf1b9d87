"""What a replay produced: one :class:`ReplayRecord` per answered fixation, and their :class:`ReplaySummary`.

Kept apart from the replay loop (``clients/replay.py``) because records are also read back from the JSON
lines of ``foveate replay --out`` and summarised or plotted without a server; ``clients.replay`` re-exports
these names.

Examples
--------
>>> r = ReplayRecord("subject-1", "1", "1001.jpg", 1, 1, False, 0.25, 2, 0.5, 0.5, 1, repeat_error=1.0)
>>> s = summarize([r])
>>> s.scored, s.skill, s.error_by_step
(1, 0.5, {2: 0.5})
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "ERROR_MEANINGS",
    "ReplayRecord",
    "ReplaySummary",
    "error_meaning",
    "skill",
    "summarize",
    "write_records",
]


@dataclass
class ReplayRecord:
    """One replayed fixation and the server's answer (one JSON line of ``--out``)."""

    stream: str
    subject: str
    image: str
    fix_index: int
    seq: int
    reset: bool
    t: float  # fixation onset, seconds since the start of the stream's session (recorded clock)
    step: int | None  # None: not applied now ("late", or "already_applied" long before)
    error: float | None  # None where no prediction existed (step 1, after a reset)
    running_error: float | None
    updates_applied: int
    repeat_error: float | None = None  # the "repeat the current embedding" baseline's error; None with error
    skipped: bool = False  # scored, but too ill-conditioned for the server to learn from

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


@dataclass
class ReplaySummary:
    """What a replay did, and how the error moved.

    ``error_first`` and ``error_last`` are the mean errors of the first and last 20% of the scored
    fixations (in processing order); ``error_by_step`` maps a step within a scanpath to the mean
    error there. ``skipped`` counts fixations not sent (off the image) or rejected by the server.

    The repeat baseline predicts the next embedding to be the current one; ``mean_repeat_error`` and
    ``repeat_error_by_step`` are its errors on the same fixations, and ``skill`` (overall and by step)
    is ``1 - mean error / mean repeat error`` over the fixations that have both: above 0 the model
    beats repeating, below 0 it does worse. They are None (empty) when the server reports no repeat
    errors. ``ill_conditioned`` counts scored fixations the server did not learn from.

    ``loss`` is what every ``error`` measures: the server's configured loss (``GET /v1/model``),
    ``whitened_mse`` by default, or None where the server did not say; :func:`error_meaning` words it.
    """

    fixations: int
    scored: int
    skipped: int
    streams: int
    seconds: float
    updates_applied: int
    mean_error: float | None
    error_first: float | None
    error_last: float | None
    error_by_step: dict[int, float] = field(default_factory=dict)
    count_by_step: dict[int, int] = field(default_factory=dict)
    mean_repeat_error: float | None = None
    skill: float | None = None
    repeat_error_by_step: dict[int, float] = field(default_factory=dict)
    skill_by_step: dict[int, float] = field(default_factory=dict)
    ill_conditioned: int = 0
    loss: str | None = None

    @property
    def rate(self) -> float:
        """Fixations per second."""
        return self.fixations / self.seconds if self.seconds > 0 else math.nan


#: What the error is under each of the learner's losses (``ModelConfig.loss``; docs/math.md).
ERROR_MEANINGS = {
    "whitened_mse": "whitened squared error |(p - z) A|^2 / D, in units of the embedding's typical change "
    "(0 = exact; repeating the current embedding scores about 1)",
    "cosine": "1 - cos(prediction, target), 0 to 2",
    "mse": "half the squared distance between prediction and target (0 = exact)",
}


def error_meaning(loss: str | None) -> str:
    """What a replay's ``error`` is, in words, for the server's ``loss`` (None: not known).

    >>> error_meaning("cosine")
    '1 - cos(prediction, target), 0 to 2'
    """
    if loss is None:
        return "the server's loss (not reported)"
    return ERROR_MEANINGS.get(loss, f"the server's {loss} loss")


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def skill(errors: Sequence[float], repeat_errors: Sequence[float]) -> float | None:
    """``1 - mean(errors) / mean(repeat_errors)`` (paired values); None when undefined.

    >>> skill([0.1, 0.3], [0.4, 0.4])
    0.5
    """
    if not len(repeat_errors) or len(errors) != len(repeat_errors):
        return None
    repeat = float(np.mean(repeat_errors))
    value = 1.0 - float(np.mean(errors)) / repeat if repeat > 0 else math.nan
    return value if math.isfinite(value) else None


def summarize(records: Sequence[ReplayRecord], seconds: float = 0.0, skipped: int = 0) -> ReplaySummary:
    """Summarise replay records (see :class:`ReplaySummary`)."""
    errors = [r.error for r in records if r.error is not None]
    fifth = max(1, len(errors) // 5) if errors else 0
    by_step: dict[int, list[float]] = {}
    paired: list[tuple[float, float]] = []
    paired_by_step: dict[int, list[tuple[float, float]]] = {}
    for r in records:
        if r.error is not None and r.step is not None:
            by_step.setdefault(r.step, []).append(r.error)
            if r.repeat_error is not None:
                paired.append((r.error, r.repeat_error))
                paired_by_step.setdefault(r.step, []).append((r.error, r.repeat_error))

    def skill_of(pairs: list[tuple[float, float]]) -> float | None:
        return skill([e for e, _ in pairs], [r for _, r in pairs])

    skill_by_step = {s: skill_of(v) for s, v in sorted(paired_by_step.items())}
    repeat_by_step = {s: float(np.mean([r for _, r in v])) for s, v in sorted(paired_by_step.items())}
    return ReplaySummary(
        fixations=len(records),
        scored=len(errors),
        skipped=skipped,
        streams=len({r.stream for r in records}),
        seconds=seconds,
        updates_applied=max((r.updates_applied for r in records), default=0),
        mean_error=_mean(errors),
        error_first=_mean(errors[:fifth]),
        error_last=_mean(errors[-fifth:]) if fifth else None,
        error_by_step={s: float(np.mean(v)) for s, v in sorted(by_step.items())},
        count_by_step={s: len(v) for s, v in sorted(by_step.items())},
        mean_repeat_error=_mean([r for _, r in paired]),
        skill=skill_of(paired),
        repeat_error_by_step=repeat_by_step,
        skill_by_step={s: v for s, v in skill_by_step.items() if v is not None},
        ill_conditioned=sum(1 for r in records if r.skipped),
    )


def write_records(records: Sequence[ReplayRecord], path: str | Path) -> None:
    """Write records as JSON lines."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(record.to_json() + "\n")
