"""The API's requests as :class:`Call` objects (method, path, body, parser), shared by both clients.

The two clients differ only in how they send (``httpx.Client`` or ``httpx.AsyncClient``) and sleep;
the requests, the answers' parsing (:func:`read_answer`) and the retry decisions
(``clients/sdk/retry.py``) are the same code, so both behave identically.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from clients.sdk import errors
from clients.sdk.fixation import Encoding, FixationFields, FixationItem, ImageLike
from clients.sdk.models import (
    Accepted,
    BatchItem,
    CheckpointInfo,
    FixationResult,
    Health,
    ModelInfo,
    Prediction,
    Ready,
    ResetResult,
    StreamInfo,
    StreamSummary,
)

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"
API_PREFIX = "/v1"
#: The environment variable the clients read their API key from when none is passed.
API_KEY_ENV = "FOVEATE_API_KEY"


def default_base_url() -> str:
    """``$FOVEATE_URL`` if set, else ``http://127.0.0.1:8000``."""
    return os.environ.get("FOVEATE_URL", "").strip() or DEFAULT_URL


def auth_headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    """``headers`` plus ``Authorization: Bearer <key>``: the key given, else ``$FOVEATE_API_KEY``, else none
    (a server on 127.0.0.1 without keys needs none)."""
    out = dict(headers or {})
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "").strip()
    if key:
        if any(c in key for c in "\r\n"):
            raise errors.InputError("the API key must be one line (it goes into an HTTP header)")
        out["Authorization"] = f"Bearer {key}"
    return out


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API request and how to read its answer.

    ``idempotent``: sending it twice has the effect of sending it once, so a request whose answer
    was lost (a dropped connection, a killed server) may be sent again. Every GET is; a fixation is
    when it carries a ``seq`` (the worker applies each (stream, seq) once and answers a repeat with
    the original result).
    """

    method: str
    path: str
    parse: Callable[[Any], T]
    json: Any = None
    params: Mapping[str, str] | None = None
    idempotent: bool = False

    @property
    def safe_to_repeat(self) -> bool:
        return self.idempotent or self.method == "GET"


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _stream_path(stream_id: str, suffix: str = "") -> str:
    if not isinstance(stream_id, str) or not stream_id:
        raise errors.InputError(f"stream_id must be a non-empty string, got {stream_id!r}")
    # The server checks the id's characters; quoting keeps a bad id from changing the path.
    return f"{API_PREFIX}/streams/{quote(stream_id, safe='')}{suffix}"


def fixation_call(
    stream_id: str,
    patch: ImageLike | None,
    fields: FixationFields,
    *,
    wait: bool,
    return_prediction: bool,
    encoding: Encoding,
) -> Call[Any]:
    item = FixationItem(stream_id, patch, **fields)
    parse: Callable[[Any], Any] = FixationResult.from_json if wait else Accepted.from_json
    body = item.to_json(encoding, with_stream=False)
    params = {"wait": _flag(wait), "return_prediction": _flag(return_prediction)}
    return Call("POST", _stream_path(stream_id, "/fixations"), parse, body, params, item.seq is not None)


def batch_call(
    items: Sequence[FixationItem | Mapping[str, Any]],
    *,
    wait: bool,
    return_prediction: bool,
    encoding: Encoding,
) -> Call[list[BatchItem]]:
    if isinstance(items, (FixationItem, Mapping)) or len(items) == 0:
        raise errors.InputError(
            "post_fixations needs a non-empty list of FixationItem (or dicts of its fields)"
        )
    fixations = [it if isinstance(it, FixationItem) else FixationItem(**it) for it in items]
    body = [it.to_json(encoding) for it in fixations]

    def parse(data: Any) -> list[BatchItem]:
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list) or len(results) != len(body):
            raise errors.ProtocolError(f"a batch of {len(body)} fixations answered {str(data)[:120]}")
        return [BatchItem.from_json(r) for r in results]

    return Call("POST", f"{API_PREFIX}/fixations/batch", parse, {"fixations": body},
                {"wait": _flag(wait), "return_prediction": _flag(return_prediction)},
                all(it.seq is not None for it in fixations))  # fmt: skip


def _list_of(parse: Callable[[Any], T], key: str) -> Callable[[Any], list[T]]:
    def run(data: Any) -> list[T]:
        items = data.get(key) if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise errors.ProtocolError(f"expected an object with a list {key!r}, got {str(data)[:120]}")
        return [parse(x) for x in items]

    return run


def _deleted(data: Any) -> bool:
    if not isinstance(data, dict) or "deleted" not in data:
        raise errors.ProtocolError(f"expected {{'stream_id', 'deleted'}}, got {str(data)[:120]}")
    return bool(data["deleted"])


def streams_call() -> Call[list[StreamSummary]]:
    return Call("GET", f"{API_PREFIX}/streams", _list_of(StreamSummary.from_json, "streams"))


def stream_call(stream_id: str) -> Call[StreamInfo]:
    return Call("GET", _stream_path(stream_id), StreamInfo.from_json)


def prediction_call(stream_id: str) -> Call[Prediction]:
    return Call("GET", _stream_path(stream_id, "/prediction"), Prediction.from_json)


def reset_call(stream_id: str) -> Call[ResetResult]:
    return Call("POST", _stream_path(stream_id, "/reset"), ResetResult.from_json, {})


def delete_call(stream_id: str) -> Call[bool]:
    return Call("DELETE", _stream_path(stream_id), _deleted)


def model_call() -> Call[ModelInfo]:
    return Call("GET", f"{API_PREFIX}/model", ModelInfo.from_json)


def checkpoint_call() -> Call[CheckpointInfo]:
    return Call("POST", f"{API_PREFIX}/model/checkpoint", CheckpointInfo.from_json, {})


def health_call() -> Call[Health]:
    return Call("GET", "/healthz", Health.from_json)


def ready_call() -> Call[Ready]:
    return Call("GET", "/readyz", Ready.from_json)


def read_answer(call: Call[T], response: httpx.Response) -> T:
    """Parse a response: the call's model for 2xx, the mapped exception raised otherwise."""
    if response.status_code >= 400:
        raise errors.error_from_response(response)
    try:
        data = response.json()
    except ValueError as exc:
        raise errors.ProtocolError(
            f"{call.method} {call.path} answered {response.status_code} with something not JSON: "
            f"{response.text[:120]!r}"
        ) from exc
    return call.parse(data)
