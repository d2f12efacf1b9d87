"""What travels between the API, the broker and the worker, and its Redis field encoding.

A :class:`Fixation` carries either a decoded patch (the API decodes HTTP bodies itself) or a
:class:`PatchSource` still to decode (a rig's message read from Redis). A :class:`Control` is a
command for the worker (reset, delete, checkpoint, queries). The worker answers both with a reply:
a JSON-able dict, ``{"ok": true, ...}`` or ``{"ok": false, "error": "<class>", "detail": "..."}``.

The Redis field format is specified in docs/redis-format.md; :func:`fixation_from_fields` is its
parser and :func:`fixation_to_fields` its writer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from learner.errors import InputError
from service.config import QUALIFIED_ID_PATTERN, STREAM_ID_PATTERN

_STREAM_ID = re.compile(STREAM_ID_PATTERN)
_QUALIFIED_ID = re.compile(QUALIFIED_ID_PATTERN)

#: A command the worker answers (``Control.command``); service/commands.py has one handler for each.
Command = Literal["streams", "stream", "prediction", "reset", "delete", "model", "checkpoint", "ping"]
COMMANDS: tuple[Command, ...] = get_args(Command)

PatchKind = Literal["patch", "raw", "frame"]


@dataclass
class PatchSource:
    """An image not decoded yet: an encoded patch, raw pixels with their shape, or a frame and a gaze point.

    ``kind`` is ``"patch"`` (PNG/JPEG bytes), ``"raw"`` (uint8 RGB bytes of ``shape`` (H, W, 3)) or
    ``"frame"`` (PNG/JPEG of the whole frame, cut at ``x``, ``y`` with ``size_px``, or ``size_deg``
    and ``px_per_deg``).
    """

    kind: PatchKind
    data: bytes
    shape: tuple[int, ...] | None = None
    x: float | None = None
    y: float | None = None
    size_px: int | None = None
    size_deg: float | None = None
    px_per_deg: float | None = None


@dataclass
class Fixation:
    """One fixation on its way to the worker.

    ``patch`` is the decoded uint8 RGB array (H, W, 3) or ``None`` while ``source`` is still to be
    decoded; ``problem`` is set instead when the message could not be parsed, so that the worker
    answers the request with that error and goes on.
    """

    stream_id: str
    seq: int | None = None
    t: float | None = None
    duration_ms: float | None = None
    reset: bool = False
    request_id: str | None = None
    return_prediction: bool = False
    patch: np.ndarray | None = None
    source: PatchSource | None = None
    entry_id: str | None = None
    problem: Exception | None = None
    #: the Redis stream the entry came from when it is not the worker's own input (a re-partition
    #: hands over another shard's entries: service/handover.py); acknowledged there
    input_key: str | None = None


@dataclass
class Control:
    """A command for the worker, answered through the same reply path as fixations."""

    command: str
    args: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    entry_id: str | None = None


def is_stream_id(stream_id: str, *, qualified: bool = True) -> bool:
    """Whether ``stream_id`` is 1-128 characters from ``A-Z a-z 0-9 _ . : -``, nothing else (the
    whole string: a trailing newline does not pass, as it does not in the API's path validation).

    ``qualified``: an id on the wire to the worker, which may carry a key's namespace in front
    (``lab-a:rig1``), so up to 161 characters."""
    return (_QUALIFIED_ID if qualified else _STREAM_ID).fullmatch(stream_id) is not None


def check_stream_id(stream_id: str) -> str:
    """Return ``stream_id`` if it is a (qualified) stream id, else raise ``InputError``."""
    if not is_stream_id(stream_id):
        raise InputError(
            f"stream_id {stream_id[:170]!r} is invalid: use 1-128 characters from A-Z a-z 0-9 _ . : - "
            "(up to 161 with a namespace in front, namespace:id)"
        )
    return stream_id


# ---------------------------------------------------------------- Redis fields -> Fixation


def _text(fields: dict[str, bytes], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    try:
        return value.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise InputError(f"field {name!r} must be UTF-8 text") from exc


def _number(fields: dict[str, bytes], name: str, *, minimum: float | None = None) -> float | None:
    text = _text(fields, name)
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError as exc:
        raise InputError(f"field {name!r} must be a number, got {text[:40]!r}") from exc
    if not math.isfinite(value):
        raise InputError(f"field {name!r} must be finite, got {text!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"field {name!r} must be >= {minimum}, got {value}")
    return value


def _integer(fields: dict[str, bytes], name: str, *, minimum: int = 0) -> int | None:
    value = _number(fields, name, minimum=minimum)
    if value is None:
        return None
    if value != int(value):
        raise InputError(f"field {name!r} must be an integer, got {value}")
    return int(value)


def _flag(fields: dict[str, bytes], name: str) -> bool:
    text = (_text(fields, name) or "0").lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no", ""):
        return False
    raise InputError(f"field {name!r} must be 0 or 1, got {text[:20]!r}")


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"H,W,3"`` into a tuple of ints (``InputError`` when it is not three positive ints)."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError as exc:
        raise InputError(f"shape must look like 'H,W,3', got {text[:40]!r}") from exc
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"shape must be three positive integers 'H,W,3', got {text[:40]!r}")
    return shape


def _source(fields: dict[str, bytes]) -> PatchSource:
    present = [name for name in ("patch", "raw", "frame") if name in fields]
    if len(present) != 1:
        raise InputError(
            "give exactly one of the fields 'patch' (PNG/JPEG), 'raw' (with 'shape'), or 'frame' "
            f"(with 'x', 'y' and 'size_px' or 'size_deg'+'px_per_deg'); got {present or 'none'}"
        )
    kind = present[0]
    data = fields[kind]
    if kind == "patch":
        return PatchSource("patch", data)
    if kind == "raw":
        shape = _text(fields, "shape")
        if not shape:
            raise InputError("field 'raw' needs 'shape' as 'H,W,3'")
        return PatchSource("raw", data, shape=parse_shape(shape))
    x, y = _number(fields, "x"), _number(fields, "y")
    if x is None or y is None:
        raise InputError("field 'frame' needs the gaze point 'x' and 'y' in frame pixels")
    size_px = _integer(fields, "size_px", minimum=1)
    size_deg = _number(fields, "size_deg", minimum=0)
    px_per_deg = _number(fields, "px_per_deg", minimum=0)
    if size_px is None and (size_deg is None or px_per_deg is None):
        raise InputError("field 'frame' needs 'size_px', or 'size_deg' and 'px_per_deg'")
    return PatchSource("frame", data, x=x, y=y, size_px=size_px, size_deg=size_deg, px_per_deg=px_per_deg)


def fixation_from_fields(fields: dict[str, bytes], entry_id: str | None = None) -> Fixation:
    """Parse a Redis input-stream entry; a bad entry gives a Fixation whose ``problem`` says why.

    The stream id and request id are read first so that even a broken message can be answered.
    """
    try:
        stream_id = _text(fields, "stream_id") or ""
        request_id = _text(fields, "request_id") or None
    except InputError as exc:
        return Fixation(stream_id="", entry_id=entry_id, problem=exc)
    fix = Fixation(stream_id=stream_id, request_id=request_id, entry_id=entry_id)
    try:
        check_stream_id(stream_id)
        fix.seq = _integer(fields, "seq")
        fix.t = _number(fields, "t")
        fix.duration_ms = _number(fields, "duration_ms", minimum=0)
        fix.reset = _flag(fields, "reset")
        fix.return_prediction = _flag(fields, "return_prediction")
        fix.source = _source(fields)
    except InputError as exc:
        fix.problem = exc
    return fix


def fixation_to_fields(fix: Fixation) -> dict[str, bytes | str]:
    """The Redis fields of a fixation whose patch is decoded (sent as ``raw`` + ``shape``)."""
    if fix.patch is None:
        raise ValueError("fixation_to_fields needs a decoded patch")
    patch = np.ascontiguousarray(fix.patch, dtype=np.uint8)
    out: dict[str, bytes | str] = {
        "stream_id": fix.stream_id,
        "reset": "1" if fix.reset else "0",
        "raw": patch.tobytes(),
        "shape": ",".join(str(n) for n in patch.shape),
    }
    for name in ("seq", "t", "duration_ms", "request_id"):
        value = getattr(fix, name)
        if value is not None:
            out[name] = str(value)
    if fix.return_prediction:
        out["return_prediction"] = "1"
    return out


# ---------------------------------------------------------------- control messages


_SIGNED = ("command", "args", "request_id", "deadline")


def _digest(fields: dict[str, bytes], secret: bytes) -> str:
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for name in _SIGNED:
        value = fields.get(name, b"")
        mac.update(len(value).to_bytes(4, "big") + value)  # length-prefixed: no field can bleed into another
    return mac.hexdigest()


def sign_control(fields: dict[str, str], secret: bytes) -> None:
    """Add ``sig``: HMAC-SHA256 of the command's fields with the API's and worker's shared secret."""
    fields["sig"] = _digest({k: v.encode() for k, v in fields.items()}, secret)


def verify_control(fields: dict[str, bytes], secret: bytes) -> bool:
    """Whether a control entry carries a valid ``sig`` (compared in constant time)."""
    sig = fields.get("sig", b"").decode("ascii", "replace")
    return hmac.compare_digest(sig, _digest(fields, secret))


def control_to_fields(ctl: Control) -> dict[str, str]:
    """The Redis fields of a command on the control stream."""
    out = {"command": ctl.command, "args": json.dumps(ctl.args)}
    if ctl.request_id:
        out["request_id"] = ctl.request_id
    return out


def control_from_fields(fields: dict[str, bytes], entry_id: str | None = None) -> Control:
    """Parse a control-stream entry; an unknown or broken one becomes command ``"invalid"``."""
    command = fields.get("command", b"").decode("utf-8", "replace")
    request_id = fields.get("request_id", b"").decode("utf-8", "replace") or None
    try:
        args = json.loads(fields.get("args", b"{}") or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        args = None
    if command not in COMMANDS or not isinstance(args, dict):
        return Control("invalid", {"command": command[:40]}, request_id, entry_id)
    return Control(command, args, request_id, entry_id)
