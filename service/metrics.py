"""Every Prometheus metric foveate exports; dashboards and alerts use only these names.

Names carry the ``foveate_`` prefix and their unit; no label takes unbounded values (never a stream
id): ``step`` is ``"1"`` … ``"20"`` or ``"20+"``, ``reason`` one of :data:`REJECT_REASONS`, ``route``
a route template.

Who serves what
---------------
The metrics live in two registries. :data:`API_REGISTRY` holds what the HTTP front end sees
(requests, latencies, rejections); :data:`WORKER_REGISTRY` what the learning worker does (fixations,
errors, updates, queue, streams, checkpoints, diagnostics, heartbeat).

- Embedded mode (``foveate serve``, no Redis): one process; its ``GET /metrics`` serves both.
- Redis mode: the API process's ``GET /metrics`` serves :data:`API_REGISTRY` only; the worker process
  serves :data:`WORKER_REGISTRY` on its own port, ``http://HOST:$FOVEATE_WORKER_METRICS_PORT/metrics``
  (default 9101), through ``prometheus_client.start_http_server``. Prometheus scrapes both.
  (``foveate serve --redis URL`` runs both halves in one process and serves both on ``/metrics``.)

API metrics
-----------
``foveate_http_requests_total{route,method,status}``, ``foveate_http_request_duration_seconds{route}``,
``foveate_rejected_requests_total{reason}``.

Worker metrics
--------------
``foveate_fixations_total``, ``foveate_updates_total``, ``foveate_prediction_error`` (histogram, cosine
error 0…2), ``foveate_error_by_step{step}`` (running mean, the paper's Fig. 4 live),
``foveate_step_error{step}`` (``_sum``/``_count``, for windowed means in PromQL),
``foveate_update_seconds``, ``foveate_batch_size``, ``foveate_queue_depth``, ``foveate_active_streams``,
``foveate_resets_total``, ``foveate_checkpoints_total``, ``foveate_last_checkpoint_timestamp_seconds``,
``foveate_rejected_messages_total{reason}``, ``foveate_effective_dimensionality``,
``foveate_embedding_norm``, ``foveate_hidden_norm``, ``foveate_retention_gain_max``,
``foveate_worker_up``, ``foveate_worker_heartbeat_timestamp_seconds``,
``foveate_worker_info{learner,device,trunk}``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

#: The fixed values of the ``reason`` label of the rejection counters.
REJECT_REASONS = (
    "bad_input",
    "malformed",
    "too_large",
    "unknown_stream",
    "overloaded",
    "queue_full",
    "too_many_streams",
    "unavailable",
    "timeout",
    "internal",
    "no_route",
)

#: Steps after a reset that get their own ``step`` label; later ones share ``"20+"``.
MAX_STEP_LABEL = 20

API_REGISTRY = CollectorRegistry(auto_describe=True)
WORKER_REGISTRY = CollectorRegistry(auto_describe=True)

# --- API ---
HTTP_REQUESTS = Counter(
    "foveate_http_requests", "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"], registry=API_REGISTRY,
)  # fmt: skip
HTTP_SECONDS = Histogram(
    "foveate_http_request_duration_seconds", "Time to answer an HTTP request, by route template.",
    ["route"], registry=API_REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)  # fmt: skip
REJECTED_REQUESTS = Counter(
    "foveate_rejected_requests", "HTTP requests answered with an error, by reason.",
    ["reason"], registry=API_REGISTRY,
)  # fmt: skip

# --- worker ---
FIXATIONS = Counter("foveate_fixations", "Fixations applied by the worker.", registry=WORKER_REGISTRY)
UPDATES = Counter("foveate_updates", "Optimizer steps applied to the model.", registry=WORKER_REGISTRY)
PREDICTION_ERROR = Histogram(
    "foveate_prediction_error", "Prediction error of each scored fixation (cosine error lies in 0..2).",
    registry=WORKER_REGISTRY,
    buckets=(0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0),
)  # fmt: skip
ERROR_BY_STEP = Gauge(
    "foveate_error_by_step", "Running mean prediction error by step since the stream's last reset.",
    ["step"], registry=WORKER_REGISTRY,
)  # fmt: skip
STEP_ERROR = Summary(
    "foveate_step_error", "Prediction error by step since the last reset (sum and count, for rate()).",
    ["step"], registry=WORKER_REGISTRY,
)  # fmt: skip
UPDATE_SECONDS = Histogram(
    "foveate_update_seconds", "Time of one learner tick (forward, RFP traces, optimizer step).",
    registry=WORKER_REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)  # fmt: skip
BATCH_SIZE = Histogram(
    "foveate_batch_size", "Fixations (streams) in one worker tick.", registry=WORKER_REGISTRY,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)  # fmt: skip
QUEUE_DEPTH = Gauge(
    "foveate_queue_depth", "Fixations waiting for the worker (in memory, plus unread in Redis).",
    registry=WORKER_REGISTRY,
)  # fmt: skip
ACTIVE_STREAMS = Gauge("foveate_active_streams", "Streams held by the worker.", registry=WORKER_REGISTRY)
RESETS = Counter(
    "foveate_resets", "Stream resets (reset flags and reset commands).", registry=WORKER_REGISTRY
)
CHECKPOINTS = Counter("foveate_checkpoints", "Checkpoints written.", registry=WORKER_REGISTRY)
LAST_CHECKPOINT = Gauge(
    "foveate_last_checkpoint_timestamp_seconds", "Unix time of the last checkpoint written.",
    registry=WORKER_REGISTRY,
)  # fmt: skip
REJECTED_MESSAGES = Counter(
    "foveate_rejected_messages", "Fixations or commands the worker rejected, by reason.",
    ["reason"], registry=WORKER_REGISTRY,
)  # fmt: skip
EFFECTIVE_DIM = Gauge(
    "foveate_effective_dimensionality", "Participation ratio of recent embeddings (collapse -> 1).",
    registry=WORKER_REGISTRY,
)  # fmt: skip
EMBEDDING_NORM = Gauge(
    "foveate_embedding_norm", "Mean L2 norm of recent embeddings.", registry=WORKER_REGISTRY
)
HIDDEN_NORM = Gauge("foveate_hidden_norm", "Mean L2 norm of the recurrent state h.", registry=WORKER_REGISTRY)
RETENTION_GAIN_MAX = Gauge(
    "foveate_retention_gain_max", "Largest retention gain of the recurrent units (>= 1: unstable).",
    registry=WORKER_REGISTRY,
)  # fmt: skip
WORKER_UP = Gauge("foveate_worker_up", "1 while the worker loop runs.", registry=WORKER_REGISTRY)
WORKER_HEARTBEAT = Gauge(
    "foveate_worker_heartbeat_timestamp_seconds", "Unix time of the worker loop's last iteration.",
    registry=WORKER_REGISTRY,
)  # fmt: skip
WORKER_INFO = Gauge(
    "foveate_worker_info", "Constant 1, labelled with the worker's learner, device and trunk.",
    ["learner", "device", "trunk"], registry=WORKER_REGISTRY,
)  # fmt: skip

# Learner diagnostics keys that feed a gauge (learner.diagnostics() may return more, or fewer).
DIAGNOSTIC_GAUGES: dict[str, Gauge] = {
    "effective_dim": EFFECTIVE_DIM,
    "participation_ratio": EFFECTIVE_DIM,
    "embedding_norm": EMBEDDING_NORM,
    "h_norm": HIDDEN_NORM,
    "hidden_norm": HIDDEN_NORM,
    "retention_gain_max": RETENTION_GAIN_MAX,
    "max_retention_gain": RETENTION_GAIN_MAX,
}


def step_label(step: int) -> str:
    """The ``step`` label of a step count: ``"1"`` … ``"20"``, then ``"20+"``."""
    return str(step) if step <= MAX_STEP_LABEL else f"{MAX_STEP_LABEL}+"


class _StepMeans:
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


_STEP_MEANS = _StepMeans()


def observe_error(step: int, error: float) -> None:
    """Record one scored fixation's prediction error at its step since reset (NaN is skipped)."""
    observe_errors((step,), (error,))


def observe_errors(steps: Sequence[int], errors: Sequence[float]) -> None:
    """:func:`observe_error` for every fixation of a tick, in order.

    The same observations, with one label lookup per step label instead of two per fixation
    (``labels()`` costs more than the observation itself).
    """
    by_label: dict[str, list[float]] = {}
    for step, error in zip(steps, errors, strict=True):
        if not math.isnan(error):
            by_label.setdefault(step_label(step), []).append(error)
    for label, values in by_label.items():
        step_error = STEP_ERROR.labels(step=label)
        for value in values:
            PREDICTION_ERROR.observe(value)
            step_error.observe(value)
        ERROR_BY_STEP.labels(step=label).set(_STEP_MEANS.add_many(label, values))


def set_diagnostics(values: dict[str, float]) -> None:
    """Copy the learner's diagnostics onto their gauges; keys without a gauge and NaNs are skipped."""
    for key, value in values.items():
        gauge = DIAGNOSTIC_GAUGES.get(key)
        if gauge is not None and value is not None and not math.isnan(float(value)):
            gauge.set(float(value))


def render(which: Literal["api", "worker", "all"] = "all") -> bytes:
    """The text exposition of the API's metrics, the worker's, or both (embedded mode)."""
    parts: list[bytes] = []
    if which in ("api", "all"):
        parts.append(generate_latest(API_REGISTRY))
    if which in ("worker", "all"):
        parts.append(generate_latest(WORKER_REGISTRY))
    return b"".join(parts)
