"""Every Prometheus metric foveate exports; dashboards and alerts use only these names.

Names carry the ``foveate_`` prefix and their unit; no label takes unbounded values (never a stream
id): ``step`` is ``"1"`` … ``"20"`` or ``"20+"`` (and, on ``foveate_prediction_skill`` only, ``"all"``),
``reason`` one of :data:`REJECT_REASONS`, ``route`` a route template.

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
``foveate_repeat_error`` and ``foveate_step_repeat_error{step}`` (the same two for the baseline that
predicts the next embedding to be the current one, scored on the same fixations),
``foveate_prediction_skill{step}`` (``1 - mean model error / mean repeat error`` over a sliding
window, below),
``foveate_skipped_ticks_total`` (fixations scored but not learned from: prediction or target too
small for a usable gradient),
``foveate_update_seconds``, ``foveate_batch_size``, ``foveate_queue_depth``, ``foveate_active_streams``,
``foveate_resets_total``, ``foveate_checkpoints_total``, ``foveate_last_checkpoint_timestamp_seconds``,
``foveate_checkpoint_seconds`` (writing one, beside learning), ``foveate_checkpoint_stall_seconds``
(learning paused for its in-memory snapshot), ``foveate_checkpoint_bytes`` (the committed
checkpoint's size) and ``foveate_checkpoint_written_bytes`` (what the last one wrote: the streams
changed since the one before, and the weights),
``foveate_rejected_messages_total{reason}``,
``foveate_duplicates_total`` (fixations whose ``(stream, seq)`` was already applied, answered without
being applied again), ``foveate_seq_gaps_total`` (applied fixations whose ``seq`` skipped numbers)
and ``foveate_seq_missing_total`` (the numbers skipped), ``foveate_replayed_fixations_total``
(Redis entries re-read at start because they came after the last checkpoint),
``foveate_journal_commands_total{event}`` (resets and deletes over Redis written to the command
journal, ``event="journaled"``, and applied again from it after a restart, ``"replayed"``),
``foveate_effective_dimensionality``,
``foveate_embedding_norm``, ``foveate_hidden_norm``, ``foveate_trace_spectral_radius_max``,
``foveate_worker_up``, ``foveate_worker_heartbeat_timestamp_seconds``,
``foveate_worker_info{learner,device,trunk}``.

Skill against repeating
-----------------------
A prediction error means little alone: on a slow embedding, predicting "the next embedding equals
this one" already scores well. Every scored fixation therefore also reports the error of that
repeat baseline, and ``foveate_prediction_skill{step}`` is ``1 - (sum of model errors) / (sum of
repeat errors)`` over the last :data:`SKILL_WINDOW` (1,000) scored fixations of each step label;
``step="all"`` is the same over the last 1,000 scored fixations of any step. 1 is a perfect
prediction, 0 no better than repeating, below 0 worse. A label gets its first value with its first
scored fixation; it is NaN while its window's repeat errors sum to 0. The running means and the
windows themselves are in ``service/running_stats.py``; this module holds one of each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

from service.running_stats import SkillWindows, StepMeans

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
    "unauthorized",
    "forbidden",
    "media_type",
    "rate_limited",
    "unsigned_command",
)

#: Steps after a reset that get their own ``step`` label; later ones share ``"20+"``.
MAX_STEP_LABEL = 20

#: Scored fixations per step label in the sliding window of ``foveate_prediction_skill``.
SKILL_WINDOW = 1000
#: The ``step`` label of ``foveate_prediction_skill`` over fixations of every step.
ALL_STEPS = "all"

_ERROR_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0)

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
    "foveate_prediction_error", "Prediction error of each scored fixation, in the configured loss.",
    registry=WORKER_REGISTRY, buckets=_ERROR_BUCKETS,
)  # fmt: skip
REPEAT_ERROR = Histogram(
    "foveate_repeat_error",
    "Error of the baseline that repeats the current embedding as the prediction, on each scored fixation "
    "(same fixations and weights as foveate_prediction_error).",
    registry=WORKER_REGISTRY, buckets=_ERROR_BUCKETS,
)  # fmt: skip
ERROR_BY_STEP = Gauge(
    "foveate_error_by_step", "Running mean prediction error by step since the stream's last reset.",
    ["step"], registry=WORKER_REGISTRY,
)  # fmt: skip
STEP_ERROR = Summary(
    "foveate_step_error", "Prediction error by step since the last reset (sum and count, for rate()).",
    ["step"], registry=WORKER_REGISTRY,
)  # fmt: skip
STEP_REPEAT_ERROR = Summary(
    "foveate_step_repeat_error", "Repeat baseline's error by step since the last reset (sum and count).",
    ["step"], registry=WORKER_REGISTRY,
)  # fmt: skip
PREDICTION_SKILL = Gauge(
    "foveate_prediction_skill",
    "1 - model error / repeat error over the last 1000 scored fixations of each step label (step=all: any "
    "step); below 0 the model predicts worse than repeating the current embedding.",
    ["step"], registry=WORKER_REGISTRY,
)  # fmt: skip
SKIPPED_TICKS = Counter(
    "foveate_skipped_ticks",
    "Fixations scored but not learned from: prediction or target too small for a usable gradient.",
    registry=WORKER_REGISTRY,
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
STATE_BYTES = Gauge(
    "foveate_state_bytes", "Memory held for the streams' state (whole chunks, free slots included).",
    registry=WORKER_REGISTRY,
)  # fmt: skip
RESIDENT_STREAMS = Gauge(
    "foveate_resident_streams", "Streams whose state is in memory (the others are spilled to disk).",
    registry=WORKER_REGISTRY,
)  # fmt: skip
SPILLED_STREAMS = Gauge(
    "foveate_spilled_streams", "Idle streams whose state waits on disk (FOVEATE_MAX_STATE_MB reached).",
    registry=WORKER_REGISTRY,
)  # fmt: skip
CHECKPOINTS = Counter("foveate_checkpoints", "Checkpoints written.", registry=WORKER_REGISTRY)
CHECKPOINT_SECONDS = Histogram(
    "foveate_checkpoint_seconds", "Time to write one checkpoint's files and commit it (beside learning).",
    registry=WORKER_REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)  # fmt: skip
CHECKPOINT_STALL_SECONDS = Histogram(
    "foveate_checkpoint_stall_seconds", "Time learning paused for a checkpoint's in-memory snapshot.",
    registry=WORKER_REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)  # fmt: skip
CHECKPOINT_BYTES = Gauge(
    "foveate_checkpoint_bytes", "Size of the last checkpoint committed (every file its manifest names).",
    registry=WORKER_REGISTRY,
)  # fmt: skip
CHECKPOINT_WRITTEN_BYTES = Gauge(
    "foveate_checkpoint_written_bytes",
    "Bytes the last checkpoint wrote (the streams changed since the one before, weights, manifest).",
    registry=WORKER_REGISTRY,
)  # fmt: skip
LAST_CHECKPOINT = Gauge(
    "foveate_last_checkpoint_timestamp_seconds", "Unix time of the last checkpoint written.",
    registry=WORKER_REGISTRY,
)  # fmt: skip
REJECTED_MESSAGES = Counter(
    "foveate_rejected_messages", "Fixations or commands the worker rejected, by reason.",
    ["reason"], registry=WORKER_REGISTRY,
)  # fmt: skip
DUPLICATES = Counter(
    "foveate_duplicates",
    "Fixations whose (stream, seq) was already applied (a retry or a re-delivery): answered with the "
    "original result, or as already applied, and not applied again.",
    registry=WORKER_REGISTRY,
)  # fmt: skip
SEQ_GAPS = Counter(
    "foveate_seq_gaps", "Applied fixations whose seq skipped numbers after the stream's last seq.",
    registry=WORKER_REGISTRY,
)  # fmt: skip
SEQ_LATE = Counter(
    "foveate_seq_late",
    "Fixations that came after a later seq of their stream had been applied (skipped by a gap): "
    "answered late, not applied, since a stream's fixations are applied in seq order.",
    registry=WORKER_REGISTRY,
)  # fmt: skip
SEQ_MISSING = Counter(
    "foveate_seq_missing", "Sequence numbers skipped by those gaps (fixations the worker never saw).",
    registry=WORKER_REGISTRY,
)  # fmt: skip
REPLAYED = Counter(
    "foveate_replayed_fixations",
    "Redis entries re-read at start because they came after the last checkpoint (each is applied "
    "again, or answered as a duplicate when the checkpoint already holds it).",
    registry=WORKER_REGISTRY,
)  # fmt: skip
JOURNAL_COMMANDS = Counter(
    "foveate_journal_commands",
    "Resets and deletes over Redis: written to the command journal before being applied "
    "(event=journaled), and applied again from it after a restart (event=replayed).",
    ["event"], registry=WORKER_REGISTRY,
)  # fmt: skip
EFFECTIVE_DIM = Gauge(
    "foveate_effective_dimensionality", "Participation ratio of recent embeddings (collapse -> 1).",
    registry=WORKER_REGISTRY,
)  # fmt: skip
EMBEDDING_NORM = Gauge(
    "foveate_embedding_norm", "Mean L2 norm of recent embeddings.", registry=WORKER_REGISTRY
)
HIDDEN_NORM = Gauge("foveate_hidden_norm", "Mean L2 norm of the recurrent state h.", registry=WORKER_REGISTRY)
TRACE_RADIUS_MAX = Gauge(
    "foveate_trace_spectral_radius_max",
    "Largest spectral radius of a recurrent unit's 2x2 Jacobian block in the latest tick: the factor by "
    "which RFP traces and state perturbations are multiplied per step (persistently > 1: they grow).",
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
    "max_trace_radius": TRACE_RADIUS_MAX,
    "trace_radius": TRACE_RADIUS_MAX,
}


def step_label(step: int) -> str:
    """The ``step`` label of a step count: ``"1"`` … ``"20"``, then ``"20+"``."""
    return str(step) if step <= MAX_STEP_LABEL else f"{MAX_STEP_LABEL}+"


_STEP_MEANS = StepMeans()
_SKILL = SkillWindows(SKILL_WINDOW)


def observe_error(step: int, error: float) -> None:
    """Record one scored fixation's prediction error at its step since reset (NaN is skipped)."""
    observe_errors((step,), (error,))


def observe_errors(
    steps: Sequence[int], errors: Sequence[float], repeat_errors: Sequence[float] | None = None
) -> None:
    """:func:`observe_error` for every fixation of a tick, in order, with the repeat baseline's errors
    when given (then ``foveate_repeat_error``, ``foveate_step_repeat_error`` and
    ``foveate_prediction_skill`` too).

    The same observations, with one label lookup per step label instead of two per fixation
    (``labels()`` costs more than the observation itself). A fixation enters the skill windows only
    when both its errors are numbers.
    """
    if repeat_errors is not None and len(repeat_errors) != len(errors):
        raise ValueError(f"{len(repeat_errors)} repeat errors for {len(errors)} errors")
    by_label: dict[str, list[float]] = {}
    repeats_by_label: dict[str, list[float]] = {}
    pairs_by_label: dict[str, list[tuple[float, float]]] = {}
    every: list[tuple[float, float]] = []  # every (error, repeat) pair of the tick, in order
    for i, (step, error) in enumerate(zip(steps, errors, strict=True)):
        repeat = math.nan if repeat_errors is None else repeat_errors[i]
        if math.isnan(error) and math.isnan(repeat):
            continue
        label = step_label(step)
        if not math.isnan(error):
            by_label.setdefault(label, []).append(error)
        if not math.isnan(repeat):
            repeats_by_label.setdefault(label, []).append(repeat)
            if not math.isnan(error):
                pairs_by_label.setdefault(label, []).append((error, repeat))
                every.append((error, repeat))
    for label, values in by_label.items():
        step_error = STEP_ERROR.labels(step=label)
        for value in values:
            PREDICTION_ERROR.observe(value)
            step_error.observe(value)
        ERROR_BY_STEP.labels(step=label).set(_STEP_MEANS.add_many(label, values))
    for label, values in repeats_by_label.items():
        step_repeat = STEP_REPEAT_ERROR.labels(step=label)
        for value in values:
            REPEAT_ERROR.observe(value)
            step_repeat.observe(value)
    for label, pairs in pairs_by_label.items():
        PREDICTION_SKILL.labels(step=label).set(_SKILL.add_many(label, pairs))
    if every:
        PREDICTION_SKILL.labels(step=ALL_STEPS).set(_SKILL.add_many(ALL_STEPS, every))


def observe_tick(
    steps: Sequence[int],
    errors: Sequence[float],
    repeat_errors: Sequence[float],
    skipped: Sequence[bool],
    trace_radius: float,
) -> None:
    """Everything one learner tick tells the metrics (``TickOutput``'s fields as plain lists): the
    errors and the repeat baseline's (:func:`observe_errors`), the fixations scored but not learned
    from, and the largest spectral radius of a Jacobian block (NaN leaves the gauge as it was)."""
    observe_errors(steps, errors, repeat_errors)
    n_skipped = sum(1 for flag in skipped if flag)
    if n_skipped:
        SKIPPED_TICKS.inc(n_skipped)
    if not math.isnan(trace_radius):
        TRACE_RADIUS_MAX.set(trace_radius)


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
