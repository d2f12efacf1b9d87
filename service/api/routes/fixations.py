"""``POST /v1/streams/{stream_id}/fixations`` and ``POST /v1/fixations/batch``."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from learner.errors import FoveateError
from service.api.deps import BrokerDep, IngestKey, Principal, SettingsDep, StreamId, ask_worker, authorize
from service.api.lean import NOT_LEAN, lean_route
from service.api.payloads import decode_item, read_fixation
from service.api.schemas import (
    Accepted,
    BatchIn,
    BatchItem,
    BatchOut,
    ErrorBody,
    FixationIn,
    FixationMeta,
    FixationResult,
)
from service.broker import Broker
from service.config import Settings
from service.errors import PayloadTooLarge, error_from_payload, error_payload
from service.messages import Fixation, is_stream_id

router = APIRouter(tags=["fixations"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Malformed JSON or multipart body",
        401: "No API key, or an unknown one",
        403: "The key lacks the ingest scope, or a browser sent the request from a foreign origin",
        408: "The body did not arrive within FOVEATE_BODY_TIMEOUT_S",
        413: "Body over FOVEATE_MAX_BODY_BYTES, or too many fixations in a batch",
        415: "The body is neither application/json nor multipart/form-data",
        422: "Invalid fields or image (undecodable, wrong shape, too many pixels, gaze off the frame)",
        429: "Queue full, too many streams, or the key's rate; retry after Retry-After seconds",
        503: "No live worker (wait=true) or Redis unreachable",
        504: "The worker did not answer within FOVEATE_SYNC_TIMEOUT_S",
    }.items()
}


def _multipart_schema() -> dict[str, Any]:
    props = dict(FixationMeta.model_json_schema()["properties"])
    props["shape"] = {"type": "string", "description": "'H,W,3' for a raw part", "example": "64,64,3"}
    for part, text in (
        ("patch", "PNG/JPEG patch"),
        ("raw", "raw RGB uint8 pixels"),
        ("frame", "PNG/JPEG frame"),
    ):
        props[part] = {"type": "string", "format": "binary", "description": f"{text} (exactly one file part)"}
    return {"type": "object", "properties": props}


_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": FixationIn.model_json_schema()},
            "multipart/form-data": {"schema": _multipart_schema()},
        },
    }
}


def _result(payload: dict[str, Any], with_prediction: bool, stream_id: str) -> FixationResult:
    if not payload.get("ok"):
        raise error_from_payload(payload)
    fields = {k: v for k, v in payload.items() if k in FixationResult.model_fields}
    fields["stream_id"] = stream_id  # the caller's id, not the worker's qualified one
    if not with_prediction:
        fields.pop("prediction", None)
    return FixationResult(**fields)


async def admit_streams(request: Request, key: Principal, qualified: list[str]) -> None:
    """The key's stream quota (service/api/quotas.py); nothing to check without keys."""
    if key.key_id is None:
        return
    broker: Broker = request.app.state.broker

    async def list_streams(namespace: str) -> list[str]:
        reply = await ask_worker(broker, "streams", prefix=f"{namespace}:")
        return [str(s["stream_id"]) for s in reply["streams"]]

    await request.app.state.stream_quota.admit(key.namespace or "", qualified, list_streams)


async def _post_one(
    request: Request,
    stream_id: str,
    broker: Broker,
    settings: Settings,
    wait: bool,
    return_prediction: bool,
    key: Principal,
) -> Any:
    qualified = key.qualify(stream_id)
    await admit_streams(request, key, [qualified])
    fix = await read_fixation(request, qualified, settings)
    fix.return_prediction = return_prediction
    await broker.submit([fix], wait=wait)
    assert fix.request_id is not None
    if not wait:
        accepted = Accepted(stream_id=stream_id, seq=fix.seq, request_id=fix.request_id, status="queued")
        return JSONResponse(accepted.model_dump(), status_code=202)
    payload = await broker.result(fix.request_id, settings.sync_timeout_s)
    return _result(payload, return_prediction, stream_id)


_BOOLS = {b"true": True, b"false": False, b"1": True, b"0": False}
_FLAGS = (b"wait", b"return_prediction")


def plain_flags(query: bytes) -> tuple[bool, bool] | None:
    """(wait, return_prediction) of a plain query string; ``None`` when FastAPI should parse it.

    Plain: each flag at most once, spelt ``true``/``false``/``1``/``0``, nothing percent-encoded.
    Other parameters are ignored, as FastAPI ignores them.
    """
    flags = {b"wait": True, b"return_prediction": False}
    seen: set[bytes] = set()
    for part in query.split(b"&") if query else ():
        name, _, value = part.partition(b"=")
        if b"%" in part or b"+" in part or (name in _FLAGS and (name in seen or value not in _BOOLS)):
            return None
        if name in _FLAGS:
            seen.add(name)
            flags[name] = _BOOLS[value]
    return flags[b"wait"], flags[b"return_prediction"]


async def lean_post_fixation(request: Request) -> Any:
    """``post_fixation`` for plain requests without FastAPI's per-request work (service.api.lean).

    A stream id off the pattern or an unusual query string goes to FastAPI (``NOT_LEAN``), so that
    its errors stay FastAPI's; the body is read and checked by the same code on both paths.
    """
    stream_id = request.scope["path_params"].get("stream_id", "")
    flags = plain_flags(request.scope["query_string"])
    if flags is None or not is_stream_id(stream_id, qualified=False):
        return NOT_LEAN
    key = authorize(request, "ingest")
    state = request.app.state
    return await _post_one(request, stream_id, state.broker, state.settings, *flags, key)


async def post_fixation(
    stream_id: StreamId,
    request: Request,
    broker: BrokerDep,
    settings: SettingsDep,
    key: IngestKey,
    wait: bool = Query(True, description="Wait for the worker's result (false: answer 202 at once)."),
    return_prediction: bool = Query(False, description="Include the predicted next embedding."),
) -> Any:
    """Send one fixation of a stream: JSON with ``patch_b64`` | ``raw_b64`` + ``shape`` |
    ``frame_b64`` + gaze, or ``multipart/form-data`` with a file part ``patch``, ``raw`` or ``frame``
    and the same fields as form fields. Returns the stream's step, this fixation's prediction error
    (against the prediction made at the previous fixation; null at step 1), the running error and
    the number of updates applied."""
    # Plain requests are answered by lean_post_fixation; this serves the rest (and documents the route).
    return await _post_one(request, stream_id, broker, settings, wait, return_prediction, key)


router.add_api_route(
    "/streams/{stream_id}/fixations",
    post_fixation,
    methods=["POST"],
    response_model=FixationResult,
    response_model_exclude_unset=True,
    responses={202: {"model": Accepted, "description": "Queued (wait=false)"}, **_ERRORS},
    openapi_extra=_BODY,
    summary="Learn from one fixation",
    route_class_override=lean_route(lean_post_fixation),  # the decorators take no route class
)


def _answer(payload: dict[str, Any] | FoveateError, with_prediction: bool, stream_id: str) -> BatchItem:
    try:
        if isinstance(payload, FoveateError):
            raise payload
        return BatchItem(ok=True, result=_result(payload, with_prediction, stream_id))
    except FoveateError as exc:
        return BatchItem(ok=False, rejected=ErrorBody(**error_payload(exc)))


@router.post(
    "/fixations/batch",
    response_model=BatchOut,
    response_model_exclude_unset=True,
    responses=_ERRORS,
    summary="Learn from many fixations, of one or several streams",
)
async def post_batch(
    body: BatchIn,
    request: Request,
    broker: BrokerDep,
    settings: SettingsDep,
    key: IngestKey,
    wait: bool = Query(True, description="Wait for every result (false: every item answers 'accepted')."),
    return_prediction: bool = Query(False, description="Include each predicted next embedding."),
) -> BatchOut:
    """Many fixations in one request (JSON only). Results come back in request order; a fixation whose
    image cannot be decoded is rejected alone (``ok: false``), the others are still applied. Fixations
    of one stream are applied in list order, one per worker tick."""
    if len(body.fixations) > settings.max_batch_fixations:
        raise PayloadTooLarge(
            f"{len(body.fixations)} fixations in one batch, more than FOVEATE_MAX_BATCH_FIXATIONS="
            f"{settings.max_batch_fixations}; split the batch"
        )

    await admit_streams(request, key, [key.qualify(item.stream_id) for item in body.fixations])

    def decode_all() -> list[Fixation]:
        return [decode_item(item, key.qualify(item.stream_id), settings) for item in body.fixations]

    fixes = await anyio.to_thread.run_sync(decode_all, limiter=request.app.state.decode_limiter)
    good = [f for f in fixes if f.problem is None]
    for fix in good:
        fix.return_prediction = return_prediction
    if good:
        await broker.submit(good, wait=wait)
    answers: dict[int, BatchItem] = {}
    if wait and good:
        done = await broker.results([f.request_id or "" for f in good], settings.sync_timeout_s)
        answers = {id(f): _answer(p, return_prediction, key.local(f.stream_id))
                   for f, p in zip(good, done, strict=True)}  # fmt: skip
    results: list[BatchItem] = []
    for fix in fixes:
        if fix.problem is not None:
            assert isinstance(fix.problem, FoveateError)
            results.append(BatchItem(ok=False, rejected=ErrorBody(**error_payload(fix.problem))))
        elif wait:
            results.append(answers[id(fix)])
        else:
            assert fix.request_id is not None
            acc = Accepted(stream_id=key.local(fix.stream_id), seq=fix.seq, request_id=fix.request_id,
                           status="queued")  # fmt: skip
            results.append(BatchItem(ok=True, accepted=acc))
    return BatchOut(results=results)
