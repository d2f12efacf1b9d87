"""Read a fixation from an HTTP request (JSON or multipart) and decode its image in a thread.

Decoding here, in the API, keeps it off the worker's critical path: the worker receives a ready
uint8 patch of ``input_size`` (in Redis mode as ``raw`` + ``shape``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import anyio
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from learner.errors import FoveateError, InputError
from service.api.schemas import FixationIn, FixationMeta
from service.config import Settings
from service.decode import decode_source
from service.errors import MalformedRequest
from service.messages import Fixation, PatchKind, PatchSource

_KINDS: dict[str, PatchKind] = {"patch_b64": "patch", "raw_b64": "raw", "frame_b64": "frame"}
_FRAME_ONLY = ("x", "y", "size_px", "size_deg", "px_per_deg")
_WHICH = (
    "give exactly one image: a patch (PNG/JPEG), raw pixels with shape [H, W, 3], or a frame with x, y "
    "and size_px (or size_deg and px_per_deg)"
)


def _b64(name: str, value: str) -> bytes:
    if value.startswith("data:") and "," in value:  # tolerate data URLs: data:image/png;base64,....
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(
            f"{name} is not valid base64 ({exc}); encode the file bytes with standard base64"
        ) from exc


def build_source(kind: PatchKind, data: bytes, meta: FixationMeta) -> PatchSource:
    """Check that the fields fit the kind of image and make the :class:`PatchSource`."""
    if kind != "frame":
        stray = [name for name in _FRAME_ONLY if getattr(meta, name) is not None]
        if stray:
            raise InputError(
                f"{', '.join(stray)} only apply to a frame (frame_b64 / file part 'frame'); remove them"
            )
    if kind == "raw":
        if meta.shape is None:
            raise InputError("raw pixels need shape [H, W, 3] ('H,W,3' in a form)")
        return PatchSource("raw", data, shape=tuple(meta.shape))
    if meta.shape is not None:
        raise InputError("shape only applies to raw pixels; remove it")
    if kind == "patch":
        return PatchSource("patch", data)
    if meta.x is None or meta.y is None:
        raise InputError("a frame needs the gaze point x and y (frame pixels, origin top-left)")
    if meta.size_px is None and (meta.size_deg is None or meta.px_per_deg is None):
        raise InputError("a frame needs size_px, or size_deg and px_per_deg")
    return PatchSource("frame", data, x=meta.x, y=meta.y, size_px=meta.size_px,
                       size_deg=meta.size_deg, px_per_deg=meta.px_per_deg)  # fmt: skip


def source_from_json(data: FixationIn) -> PatchSource:
    """The image of a JSON fixation (exactly one of the ``*_b64`` fields)."""
    given = [name for name in _KINDS if getattr(data, name) is not None]
    if len(given) != 1:
        raise InputError(f"{_WHICH}; got {', '.join(given) or 'none of patch_b64, raw_b64, frame_b64'}")
    name = given[0]
    return build_source(_KINDS[name], _b64(name, getattr(data, name)), data)


def _validation(exc: ValidationError) -> RequestValidationError:
    return RequestValidationError(exc.errors(include_url=False, include_context=True))


async def _from_form(request: Request) -> tuple[FixationMeta, PatchSource]:
    try:
        form = await request.form(max_files=4, max_fields=32)
    except MultiPartException as exc:
        raise MalformedRequest(f"cannot parse the multipart body: {exc}") from exc
    except StarletteHTTPException as exc:  # inside an app, Starlette turns the parser's error into a 400
        if exc.status_code != 400:
            raise
        raise MalformedRequest(f"cannot parse the multipart body: {exc.detail}") from exc
    fields: dict[str, Any] = {}
    files: dict[str, UploadFile] = {}
    for key, value in form.multi_items():
        if key in fields or key in files:
            raise InputError(f"form field {key!r} is given twice")
        if isinstance(value, UploadFile):
            if key not in ("patch", "frame", "raw"):
                raise InputError(
                    f"file part {key!r} is not known: send the image as 'patch', 'frame' or 'raw'"
                )
            files[key] = value
        elif key in ("patch", "frame", "raw"):
            raise InputError(f"{key!r} must be a file part (curl -F {key}=@image.png), not a text field")
        else:
            fields[key] = value
    try:
        meta = FixationMeta.model_validate(fields)
    except ValidationError as exc:
        raise _validation(exc) from exc
    if len(files) != 1:
        raise InputError(
            f"{_WHICH}: send one file part 'patch', 'raw' or 'frame', got {sorted(files) or 'none'}"
        )
    kind, upload = next(iter(files.items()))
    data = await upload.read()
    return meta, build_source(kind, data, meta)  # type: ignore[arg-type]


#: Raw patches up to this size (a 256 x 256 RGB patch) are decoded on the event loop.
_INLINE_RAW_BYTES = 256 * 256 * 3


async def read_fixation(request: Request, stream_id: str, settings: Settings) -> Fixation:
    """Parse the body of ``POST /v1/streams/{id}/fixations`` and decode its image (small raw patches
    on the event loop, anything else in a thread).

    JSON (``application/json``; service/api/middleware.py refuses other types) or
    ``multipart/form-data`` with a file part.
    """
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        meta, source = await _from_form(request)
    else:
        body = await request.body()
        try:
            data = FixationIn.model_validate_json(body)
        except ValidationError as exc:
            raise _validation(exc) from exc
        meta, source = data, source_from_json(data)
    fix = Fixation(
        stream_id=stream_id, seq=meta.seq, t=meta.t, duration_ms=meta.duration_ms, reset=meta.reset
    )
    if source.kind == "raw" and len(source.data) <= _INLINE_RAW_BYTES:
        fix.patch = _decode(source, settings)  # a small copy: cheaper than a hop to a thread
    else:
        fix.patch = await anyio.to_thread.run_sync(  # PNG/JPEG, frames
            _decode, source, settings, limiter=request.app.state.decode_limiter
        )
    return fix


def _decode(source: PatchSource, settings: Settings) -> Any:
    return decode_source(
        source, max_pixels=settings.max_pixels, size=settings.input_size, max_patch_px=settings.max_patch_px
    )


def decode_item(item: FixationIn, stream_id: str, settings: Settings) -> Fixation:
    """A batch item as a Fixation; a bad image sets ``problem`` instead of raising (runs in a thread)."""
    fix = Fixation(
        stream_id=stream_id, seq=item.seq, t=item.t, duration_ms=item.duration_ms, reset=item.reset
    )
    try:
        fix.patch = _decode(source_from_json(item), settings)
    except FoveateError as exc:
        fix.problem = exc
    return fix
