"""Typed results of the API: frozen dataclasses built from the JSON answers.

Each model takes the fields it knows and ignores the others, so a newer server that adds a field
does not break an older client; a missing required field is a :class:`~clients.sdk.errors.ProtocolError`.
Predicted embeddings come back as float32 numpy arrays of shape (D,).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from clients.sdk.errors import APIError, ProtocolError, error_from_body

__all__ = [
    "Accepted",
    "BatchItem",
    "CheckpointInfo",
    "FixationResult",
    "Health",
    "ModelInfo",
    "Prediction",
    "Ready",
    "ResetResult",
    "StepError",
    "StreamInfo",
    "StreamSummary",
]

T = TypeVar("T")


def _vector(value: Any) -> np.ndarray | None:
    return None if value is None else np.asarray(value, dtype=np.float32)  # (D,)


def _build(cls: type[T], data: Any, convert: dict[str, Callable[[Any], Any]] | None = None) -> T:
    """Make ``cls`` from a JSON object, converting some fields and ignoring unknown ones."""
    if not isinstance(data, dict):
        raise ProtocolError(f"expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    convert = convert or {}
    kwargs: dict[str, Any] = {}
    missing: list[str] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            value = data[f.name]
            kwargs[f.name] = convert[f.name](value) if f.name in convert and value is not None else value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing.append(f.name)
    if missing:
        raise ProtocolError(f"{cls.__name__} answer lacks {', '.join(missing)}: is this a foveate server?")
    return cls(**kwargs)


@dataclass(frozen=True)
class FixationResult:
    """What the worker answered for one fixation.

    Attributes
    ----------
    stream_id, seq
        The stream and the client's sequence number (None if none was sent).
    status
        ``"applied"``; ``"duplicate"``: this ``seq`` was applied before (a retry), the fields are the
        original result's; ``"late"``: a later ``seq`` was applied before this one came, so it is not
        applied (in-order learning); ``"already_applied"``: applied before, its result no longer kept.
    gap
        Sequence numbers skipped before this one (fixations the server never saw).
    step
        Fixations since the stream's last reset, this one included (1 = first after a reset); None
        when ``status`` is ``"late"`` or ``"already_applied"``.
    error
        This fixation's prediction error; None where nothing was predicted (step 1).
    repeat_error
        The error of the baseline that predicts the next embedding to be the current one, on the same
        fixation; None where ``error`` is None (and from servers before it was reported).
    skill
        ``1 - error / repeat_error``: 1 perfect, 0 no better than repeating, below 0 worse; None where
        undefined (``repeat_error`` None or 0).
    skipped
        The fixation was scored but not learned from (too ill-conditioned for a usable gradient).
    running_error
        The stream's moving-average error (None until a fixation was scored).
    updates_applied
        Optimizer steps applied to the model so far.
    prediction
        Predicted embedding of the next fixation (D,), when asked for with ``return_prediction``.
    """

    stream_id: str
    step: int | None
    error: float | None
    running_error: float | None
    updates_applied: int
    seq: int | None = None
    request_id: str | None = None
    prediction: np.ndarray | None = field(default=None, compare=False, repr=False)
    repeat_error: float | None = None
    skill: float | None = None
    skipped: bool = False
    status: str = "applied"
    gap: int = 0

    @classmethod
    def from_json(cls, data: Any) -> FixationResult:
        return _build(cls, data, {"prediction": _vector})


@dataclass(frozen=True)
class Accepted:
    """Answer to ``wait=False``: queued, not yet applied; the result is not returned over HTTP."""

    stream_id: str
    request_id: str
    seq: int | None = None
    status: str = "queued"

    @classmethod
    def from_json(cls, data: Any) -> Accepted:
        return _build(cls, data)


@dataclass(frozen=True)
class BatchItem:
    """One entry of a batch answer, in request order: a result, an acceptance, or an error.

    ``error`` is the exception the item was rejected with (not raised); :meth:`unwrap` raises it.
    """

    ok: bool
    result: FixationResult | None = None
    accepted: Accepted | None = None
    error: APIError | None = field(default=None, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> BatchItem:
        if not isinstance(data, dict) or "ok" not in data:
            raise ProtocolError(f"a batch item must be an object with 'ok', got {str(data)[:80]}")
        rejected = data.get("rejected")
        return cls(
            ok=bool(data["ok"]),
            result=None if data.get("result") is None else FixationResult.from_json(data["result"]),
            accepted=None if data.get("accepted") is None else Accepted.from_json(data["accepted"]),
            error=None if rejected is None else error_from_body(rejected),
        )

    def unwrap(self) -> FixationResult | Accepted:
        """The result (or acceptance); raises the item's error if it was rejected."""
        if self.error is not None:
            raise self.error
        value = self.result if self.result is not None else self.accepted
        if value is None:
            raise ProtocolError("a batch item with neither result, acceptance nor error")
        return value


@dataclass(frozen=True)
class StreamSummary:
    """A stream in ``GET /v1/streams``."""

    stream_id: str
    step: int
    fixations: int
    updated_at: float
    running_error: float | None = None
    last_seq: int | None = None

    @classmethod
    def from_json(cls, data: Any) -> StreamSummary:
        return _build(cls, data)


@dataclass(frozen=True)
class StepError:
    """One recent error, the step it was made at, and the repeat baseline's error there."""

    step: int
    error: float
    repeat_error: float | None = None

    @classmethod
    def from_json(cls, data: Any) -> StepError:
        return _build(cls, data)


@dataclass(frozen=True)
class StreamInfo(StreamSummary):
    """Everything the worker knows about one stream (``GET /v1/streams/{id}``)."""

    created_at: float = 0.0
    scored: int = 0
    resets: int = 0
    mean_error: float | None = None
    last_error: float | None = None
    last_t: float | None = None
    last_entry_id: str | None = None
    recent_errors: list[StepError] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    mean_repeat_error: float | None = None
    last_repeat_error: float | None = None
    skill: float | None = None
    skipped: int = 0

    @classmethod
    def from_json(cls, data: Any) -> StreamInfo:
        return _build(cls, data, {"recent_errors": lambda v: [StepError.from_json(e) for e in v]})


@dataclass(frozen=True)
class Prediction:
    """A stream's predicted next embedding (None before its first fixation)."""

    stream_id: str
    step: int
    prediction: np.ndarray | None = field(compare=False, repr=False)

    @classmethod
    def from_json(cls, data: Any) -> Prediction:
        return _build(cls, data, {"prediction": _vector})


@dataclass(frozen=True)
class ResetResult:
    """A reset stream: its step is 0, so its next fixation is step 1 and is not scored."""

    stream_id: str
    step: int

    @classmethod
    def from_json(cls, data: Any) -> ResetResult:
        return _build(cls, data)


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint the worker wrote."""

    path: str
    written_at: float
    updates_applied: int
    streams: int
    seconds: float | None = None

    @classmethod
    def from_json(cls, data: Any) -> CheckpointInfo:
        return _build(cls, data)


@dataclass(frozen=True)
class ModelInfo:
    """``GET /v1/model``: the model configuration, parameter counts and counters."""

    learner: str
    device: str
    config: dict[str, Any]
    parameters: dict[str, int]
    trainable_parameters: int
    updates_applied: int
    ticks: int
    streams: int
    bytes_per_stream: int
    last_checkpoint: CheckpointInfo | None = None

    @classmethod
    def from_json(cls, data: Any) -> ModelInfo:
        return _build(cls, data, {"last_checkpoint": CheckpointInfo.from_json})


@dataclass(frozen=True)
class Health:
    """``/healthz``: the API process answers."""

    status: str

    @classmethod
    def from_json(cls, data: Any) -> Health:
        return _build(cls, data)


@dataclass(frozen=True)
class Ready:
    """``/readyz``: a worker is alive (``mode`` is ``embedded`` or ``redis``)."""

    status: str
    mode: str
    detail: str

    @classmethod
    def from_json(cls, data: Any) -> Ready:
        return _build(cls, data)
