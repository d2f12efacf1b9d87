"""``/v1/streams``: list, inspect, reset and delete streams (answered by the worker, which owns them).

A key sees only its namespace's streams (service/api/deps.py ``Principal``): the ids it names are
qualified before they reach the worker, and the worker's ids are turned back in every answer. A
stream of another namespace is answered like one that does not exist (404).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from service.api.deps import BrokerDep, IngestKey, Principal, ReadKey, StreamId, ask_worker
from service.api.schemas import (
    CommandIn,
    DeleteOut,
    ErrorBody,
    PredictionOut,
    ResetOut,
    StreamInfo,
    StreamList,
)
from service.errors import Forbidden

router = APIRouter(prefix="/streams", tags=["streams"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No API key, or an unknown one"},
    403: {"model": ErrorBody, "description": "The key lacks the route's scope"},
    404: {"model": ErrorBody, "description": "No such stream (in this key's namespace)"},
    422: {"model": ErrorBody, "description": "Invalid stream id"},
    429: {"model": ErrorBody, "description": "The key's request rate is exceeded; see Retry-After"},
    503: {"model": ErrorBody, "description": "No live worker, or Redis unreachable"},
    504: {"model": ErrorBody, "description": "The worker did not answer in time"},
}


def _own(key: Principal, reply: dict[str, Any]) -> dict[str, Any]:
    """A worker's answer about one stream, with the id the caller knows it by."""
    return {**reply, "stream_id": key.local(str(reply["stream_id"]))}


@router.get("", response_model=StreamList, responses=_ERRORS, summary="List the streams of the key")
async def list_streams(
    broker: BrokerDep,
    key: ReadKey,
    all_namespaces: bool = Query(
        False, alias="all", description="Every namespace's streams, with qualified ids (admin keys only)."
    ),
) -> Any:
    if all_namespaces and not key.admin:
        raise Forbidden(f"?all=true lists every namespace's streams and needs an admin key; key {key.key_id} "
                        "is not one (leave out ?all to list your own)")  # fmt: skip
    prefix = "" if all_namespaces else key.prefix
    reply = await ask_worker(broker, "streams", prefix=prefix)
    own = [s for s in reply["streams"] if str(s["stream_id"]).startswith(prefix)]
    streams = own if all_namespaces else [_own(key, s) for s in own]
    return {"streams": streams, "count": len(streams)}


@router.get("/{stream_id}", response_model=StreamInfo, responses=_ERRORS, summary="One stream's state")
async def get_stream(stream_id: StreamId, broker: BrokerDep, key: ReadKey) -> Any:
    """Step since the last reset, fixations, errors (running, mean, last, the 20 most recent),
    timestamps (created, updated, the client's last ``t``), last ``seq`` and Redis entry id."""
    return _own(key, (await ask_worker(broker, "stream", stream_id=key.qualify(stream_id)))["stream"])


@router.get("/{stream_id}/prediction", response_model=PredictionOut, responses=_ERRORS,
            summary="The stream's predicted next embedding")  # fmt: skip
async def get_prediction(stream_id: StreamId, broker: BrokerDep, key: ReadKey) -> Any:
    reply = await ask_worker(broker, "prediction", stream_id=key.qualify(stream_id))
    return _own(key, {k: reply[k] for k in ("stream_id", "step", "prediction")})


@router.post("/{stream_id}/reset", response_model=ResetOut, responses=_ERRORS, summary="Start a new sequence")
async def reset_stream(stream_id: StreamId, body: CommandIn, broker: BrokerDep, key: IngestKey) -> Any:
    """Zero the stream's state (h, c, traces, step); the next fixation is step 1 and is not scored.
    Applied between worker ticks: fixations already queued for the stream come after it. The body is
    the JSON object ``{}``."""
    reply = await ask_worker(broker, "reset", stream_id=key.qualify(stream_id))
    return _own(key, {"stream_id": reply["stream_id"], "step": reply["step"]})


@router.delete("/{stream_id}", response_model=DeleteOut, responses=_ERRORS, summary="Forget a stream")
async def delete_stream(stream_id: StreamId, request: Request, broker: BrokerDep, key: IngestKey) -> Any:
    reply = await ask_worker(broker, "delete", stream_id=key.qualify(stream_id))
    request.app.state.stream_quota.forget(key.namespace or "", key.qualify(stream_id))
    return _own(key, {"stream_id": reply["stream_id"], "deleted": reply["deleted"]})
