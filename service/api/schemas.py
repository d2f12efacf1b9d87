"""Request and response models of the HTTP API (pydantic v2); the OpenAPI schema is generated from them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.config import STREAM_ID_PATTERN
from service.messages import parse_shape


class ErrorBody(BaseModel):
    """Every error answer: the exception class and what to fix."""

    error: str = Field(examples=["PatchError"])
    detail: str = Field(
        examples=["cannot decode image (12 bytes, unknown format): send PNG or JPEG file bytes"]
    )


class FixationMeta(BaseModel):
    """Fields of a fixation other than its image (also the form fields of a multipart upload)."""

    model_config = ConfigDict(extra="forbid")

    seq: int | None = Field(default=None, ge=0, description="The client's sequence number within the stream.")
    t: float | None = Field(
        default=None, allow_inf_nan=False, description="Fixation onset, seconds (client clock)."
    )
    duration_ms: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="Fixation duration."
    )
    reset: bool = Field(default=False, description="Start a new sequence (new scene) before this fixation.")
    shape: tuple[int, int, int] | None = Field(
        default=None, description="(H, W, 3) of raw pixels; 'H,W,3' in a form."
    )
    x: float | None = Field(
        default=None, allow_inf_nan=False, description="Gaze x in frame pixels (origin top-left)."
    )
    y: float | None = Field(default=None, allow_inf_nan=False, description="Gaze y in frame pixels (y down).")
    size_px: int | None = Field(
        default=None, ge=2, description="Side of the patch cut from the frame, pixels."
    )
    size_deg: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Patch side in degrees."
    )
    px_per_deg: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Pixels per degree."
    )

    @field_validator("shape", mode="before")
    @classmethod
    def _shape_text(cls, value: Any) -> Any:
        return parse_shape(value) if isinstance(value, str) else value


class FixationIn(FixationMeta):
    """One fixation as JSON: give exactly one of ``patch_b64``, ``raw_b64`` (+ ``shape``), ``frame_b64``
    (+ ``x``, ``y`` and ``size_px``, or ``size_deg`` and ``px_per_deg``)."""

    patch_b64: str | None = Field(default=None, description="PNG or JPEG of the patch, base64.")
    raw_b64: str | None = Field(default=None, description="Raw RGB uint8 pixels (row-major H, W, 3), base64.")
    frame_b64: str | None = Field(
        default=None, description="PNG or JPEG of the whole frame, base64; cut at x, y."
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"seq": 3, "t": 12.25, "duration_ms": 190, "patch_b64": "iVBORw0KGgo..."}]
        },
    )


class BatchFixationIn(FixationIn):
    """A fixation in a batch names its stream."""

    stream_id: str = Field(pattern=STREAM_ID_PATTERN)


class BatchIn(BaseModel):
    """Many fixations, possibly of several streams; each stream's fixations are applied in list order."""

    model_config = ConfigDict(extra="forbid")

    fixations: list[BatchFixationIn] = Field(min_length=1)


class FixationResult(BaseModel):
    """What the worker answered for one fixation."""

    stream_id: str
    seq: int | None = None
    status: Literal["applied", "duplicate", "late", "already_applied"] = Field(
        default="applied",
        description="applied: learned from now. duplicate: this (stream, seq) was applied before with "
        "the same image (a retry); the fields are the original result's and nothing was applied again. "
        "late: a later seq of the stream was applied before this one came (its gap was reported "
        "then); fixations apply in seq order, so nothing is applied; step and scores null. "
        "already_applied: applied before, too long ago for its result to be kept; nothing applied, "
        "step and scores null.",
    )
    gap: int = Field(
        default=0,
        description="Sequence numbers skipped between the stream's last applied seq and this one "
        "(fixations the worker never saw); 0 without seq.",
    )
    step: int | None = Field(
        description="Fixations since the stream's last reset, this one included; null when "
        "status is late or already_applied."
    )
    error: float | None = Field(
        description="This fixation's prediction error; null at step 1 (nothing predicted)."
    )
    repeat_error: float | None = Field(
        default=None,
        description="The error of the baseline that predicts the next embedding to be the current one, "
        "on this fixation with the same weights; null where error is null.",
    )
    skill: float | None = Field(
        default=None,
        description="1 - error / repeat_error for this fixation: 1 perfect, 0 no better than repeating the "
        "current embedding, below 0 worse (one fixation's skill is noisy; foveate_prediction_skill "
        "averages); null where repeat_error is null or 0.",
    )
    skipped: bool = Field(
        default=False,
        description="Scored, but not learned from: the prediction or the target was too small (too "
        "ill-conditioned) for a usable gradient. Its error is still reported.",
    )
    running_error: float | None = Field(description="Moving average of the stream's errors (weight 0.1).")
    updates_applied: int = Field(description="Optimizer steps applied to the model so far.")
    request_id: str | None = None
    prediction: list[float] | None = Field(
        default=None, description="Predicted next embedding (?return_prediction=true)."
    )


class Accepted(BaseModel):
    """Answer to ``?wait=false``: queued, not yet applied."""

    stream_id: str
    seq: int | None = None
    request_id: str
    status: str = "queued"


class BatchItem(BaseModel):
    """One entry of a batch answer: a result, an acceptance (wait=false), or why it was rejected."""

    ok: bool
    result: FixationResult | None = None
    accepted: Accepted | None = None
    rejected: ErrorBody | None = None


class BatchOut(BaseModel):
    results: list[BatchItem]


class StreamSummary(BaseModel):
    stream_id: str
    step: int
    fixations: int
    running_error: float | None = None
    last_seq: int | None = None
    updated_at: float


class StreamList(BaseModel):
    streams: list[StreamSummary]
    count: int


class StepError(BaseModel):
    step: int
    error: float
    repeat_error: float | None = Field(default=None, description="The repeat baseline's error there.")


class StreamInfo(StreamSummary):
    """Everything the worker knows about one stream."""

    created_at: float
    scored: int
    resets: int
    mean_error: float | None = None
    last_error: float | None = None
    mean_repeat_error: float | None = Field(
        default=None, description="Mean error of repeating the current embedding, on the same fixations."
    )
    last_repeat_error: float | None = Field(
        default=None, description="The repeat baseline's error on the last fixation (null with last_error)."
    )
    skill: float | None = Field(
        default=None,
        description="1 - (sum of errors) / (sum of repeat errors) over the stream's scored fixations; "
        "below 0 the model predicts worse than repeating the current embedding.",
    )
    skipped: int = Field(default=0, description="Scored fixations not learned from (ill-conditioned).")
    last_t: float | None = None
    last_entry_id: str | None = None
    recent_errors: list[StepError]
    state: dict[str, Any] = Field(description="The learner's view: step, fixations, h_norm.")


class PredictionOut(BaseModel):
    stream_id: str
    step: int
    prediction: list[float] | None = Field(
        description="Predicted next embedding; null before the first fixation."
    )


class ResetOut(BaseModel):
    stream_id: str
    step: int


class DeleteOut(BaseModel):
    stream_id: str
    deleted: bool


class CheckpointOut(BaseModel):
    path: str
    written_at: float
    updates_applied: int
    streams: int
    seconds: float | None = Field(default=None, description="writing the files, beside learning")
    stall_seconds: float | None = Field(default=None, description="learning paused for the snapshot")
    bytes: int | None = Field(default=None, description="the committed checkpoint's size")
    bytes_written: int | None = Field(default=None, description="written by this one")
    streams_written: int | None = Field(default=None, description="streams changed since the last one")


class DistributedInfo(BaseModel):
    """The answering rank's place in a distributed worker (``foveate worker --distributed``)."""

    rank: int
    world_size: int
    fingerprint: str = Field(
        description="SHA-256 of the shared state: equal on every rank of a healthy group"
    )
    learning_ticks: int
    collective_seconds: float


class ModelInfo(BaseModel):
    learner: str
    device: str
    config: dict[str, Any]
    parameters: dict[str, int]
    trainable_parameters: int
    updates_applied: int
    ticks: int
    streams: int
    bytes_per_stream: int
    last_checkpoint: CheckpointOut | None = None
    distributed: DistributedInfo | None = Field(
        default=None, description="With a distributed worker: rank 0's answer (its streams only in `streams`)"
    )


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    mode: str
    detail: str


class CommandIn(BaseModel):
    """The body of ``POST .../reset`` and ``POST /v1/model/checkpoint``: a JSON object, ``{}``.

    A state-changing POST needs a JSON body so that a browser cannot send it cross-origin as a
    "simple" request (one sent without asking the server first)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{}]})
