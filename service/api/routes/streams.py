"""``/v1/streams``: list, inspect, reset and delete streams (answered by the worker, which owns them)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.deps import BrokerDep, StreamId, ask_worker
from service.api.schemas import DeleteOut, ErrorBody, PredictionOut, ResetOut, StreamInfo, StreamList

router = APIRouter(prefix="/streams", tags=["streams"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such stream"},
    422: {"model": ErrorBody, "description": "Invalid stream id"},
    503: {"model": ErrorBody, "description": "No live worker, or Redis unreachable"},
    504: {"model": ErrorBody, "description": "The worker did not answer in time"},
}


@router.get("", response_model=StreamList, responses=_ERRORS, summary="List the worker's streams")
async def list_streams(broker: BrokerDep) -> Any:
    reply = await ask_worker(broker, "streams")
    return {"streams": reply["streams"], "count": reply["count"]}


@router.get("/{stream_id}", response_model=StreamInfo, responses=_ERRORS, summary="One stream's state")
async def get_stream(stream_id: StreamId, broker: BrokerDep) -> Any:
    """Step since the last reset, fixations, errors (running, mean, last, the 20 most recent),
    timestamps (created, updated, the client's last ``t``), last ``seq`` and Redis entry id."""
    return (await ask_worker(broker, "stream", stream_id=stream_id))["stream"]


@router.get("/{stream_id}/prediction", response_model=PredictionOut, responses=_ERRORS,
            summary="The stream's predicted next embedding")  # fmt: skip
async def get_prediction(stream_id: StreamId, broker: BrokerDep) -> Any:
    reply = await ask_worker(broker, "prediction", stream_id=stream_id)
    return {k: reply[k] for k in ("stream_id", "step", "prediction")}


@router.post("/{stream_id}/reset", response_model=ResetOut, responses=_ERRORS, summary="Start a new sequence")
async def reset_stream(stream_id: StreamId, broker: BrokerDep) -> Any:
    """Zero the stream's state (h, c, traces, step); the next fixation is step 1 and is not scored.
    Applied between worker ticks: fixations already queued for the stream come after it."""
    reply = await ask_worker(broker, "reset", stream_id=stream_id)
    return {"stream_id": reply["stream_id"], "step": reply["step"]}


@router.delete("/{stream_id}", response_model=DeleteOut, responses=_ERRORS, summary="Forget a stream")
async def delete_stream(stream_id: StreamId, broker: BrokerDep) -> Any:
    reply = await ask_worker(broker, "delete", stream_id=stream_id)
    return {"stream_id": reply["stream_id"], "deleted": reply["deleted"]}
