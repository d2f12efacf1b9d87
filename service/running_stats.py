"""The running statistics behind the per-step gauges of ``service/metrics.py``: a running mean per
label, and the sliding-window skill of the model against repeating the current embedding.

Plain Python (no Prometheus, no torch): ``metrics.py`` holds one of each and sets its gauges from
them; ``skill`` also scores a single reply and a stream's totals.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable


def skill(error: float, repeat_error: float) -> float:
    """``1 - error / repeat_error``: 1 perfect, 0 as good as repeating the current embedding, below 0
    worse; NaN when ``repeat_error`` is not positive and finite or the result is not finite.

    >>> skill(0.25, 0.5), skill(0.5, 0.25), math.isnan(skill(0.1, 0.0))
    (0.5, -1.0, True)
    """
    if not (repeat_error > 0.0 and math.isfinite(repeat_error)):
        return math.nan
    value = 1.0 - error / repeat_error
    return value if math.isfinite(value) else math.nan


class StepMeans:
    """Running mean per step label: the plain mean for the first 1/alpha values, then an EMA.

    The plain start makes the first values count fully; the EMA afterwards lets the live curve follow
    learning instead of freezing on the service's whole history.
    """

    def __init__(self, alpha: float = 0.01) -> None:
        self.alpha = alpha
        self._lock = threading.Lock()
        self._mean: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def add(self, label: str, value: float) -> float:
        return self.add_many(label, (value,))

    def add_many(self, label: str, values: Iterable[float]) -> float:
        """Add the values in order; the mean after the last."""
        with self._lock:
            n = self._count.get(label, 0)
            mean = self._mean.get(label, 0.0)
            for value in values:
                n += 1
                mean += max(1.0 / n, self.alpha) * (value - mean)
            self._count[label] = n
            self._mean[label] = mean
            return mean


class SkillWindows:
    """Per label, the sums of the model's and the repeat baseline's errors over the last ``size``
    scored fixations, and the skill ``1 - model / repeat`` they give.

    The sums move by one addition and one subtraction per fixation; they are summed afresh
    (``math.fsum``) every ``size`` evictions, so rounding cannot drift on a long-running worker.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._lock = threading.Lock()
        self._pairs: dict[str, deque[tuple[float, float]]] = {}
        self._sums: dict[str, list[float]] = {}  # label -> [model error sum, repeat error sum]
        self._evicted: dict[str, int] = {}

    def add_many(self, label: str, pairs: Iterable[tuple[float, float]]) -> float:
        """Add (model error, repeat error) pairs in order; the label's skill after the last (NaN when
        its window's repeat errors sum to 0)."""
        with self._lock:
            window = self._pairs.setdefault(label, deque())
            sums = self._sums.setdefault(label, [0.0, 0.0])
            evicted = self._evicted.get(label, 0)
            for error, repeat in pairs:
                if len(window) == self.size:
                    old_error, old_repeat = window.popleft()
                    sums[0] -= old_error
                    sums[1] -= old_repeat
                    evicted += 1
                window.append((error, repeat))
                sums[0] += error
                sums[1] += repeat
            if evicted >= self.size:
                sums[0] = math.fsum(e for e, _ in window)
                sums[1] = math.fsum(r for _, r in window)
                evicted = 0
            self._evicted[label] = evicted
            return skill(sums[0], sums[1])

    def count(self, label: str) -> int:
        """Fixations in the label's window now."""
        with self._lock:
            return len(self._pairs.get(label, ()))
