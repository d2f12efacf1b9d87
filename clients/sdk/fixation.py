"""What a fixation carries: :class:`FixationItem`, and the encoding of numpy images (PNG, JPEG, raw).

Used by both HTTP clients (JSON bodies with base64 images) and by the Redis producer (entry fields
with the image bytes as they are).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import numpy as np

from clients.sdk import errors

__all__ = ["Encoding", "FixationFields", "FixationItem", "ImageLike", "encode_image"]

Encoding = Literal["png", "jpeg", "raw"]
#: A patch or frame: an RGB uint8 array (H, W, 3) or grey (H, W), or PNG/JPEG file bytes.
ImageLike = np.ndarray | bytes | bytearray | memoryview

_ENCODINGS = ("png", "jpeg", "raw")


def _as_uint8_image(image: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise errors.PatchError(
            f"{what} must be a uint8 array (RGB 0-255), got dtype {arr.dtype}; "
            "convert with arr.astype(np.uint8)"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)) or arr.size == 0:
        raise errors.PatchError(f"{what} must have shape (H, W, 3) RGB or (H, W) grey, got {arr.shape}")
    return np.ascontiguousarray(arr)


def encode_image(image: np.ndarray, encoding: Literal["png", "jpeg"], *, what: str = "patch") -> bytes:
    """Encode an RGB (H, W, 3) or grey (H, W) uint8 array as PNG (lossless) or JPEG (quality 95)."""
    import cv2  # only needed when the client encodes arrays

    arr = _as_uint8_image(image, what)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR; foveate works in RGB
    ext, params = (".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]) if encoding == "png" else (
        ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95])  # fmt: skip
    ok, buf = cv2.imencode(ext, arr, params)
    if not ok:
        raise errors.PatchError(f"OpenCV could not encode the {what} as {encoding}")
    return bytes(buf)


class FixationFields(TypedDict, total=False):
    """Optional fields of a fixation (keyword arguments of ``post_fixation``)."""

    frame: ImageLike | None
    x: float | None
    y: float | None
    size_px: int | None
    size_deg: float | None
    px_per_deg: float | None
    seq: int | None
    t: float | None
    duration_ms: float | None
    reset: bool
    encoding: Encoding | None


@dataclass
class FixationItem:
    """One fixation to send: its stream, its image, and when it happened.

    Give exactly one image: ``patch`` (an RGB uint8 array, encoded by the client as PNG, JPEG or
    raw pixels, or PNG/JPEG bytes sent as they are), or ``frame`` (array or PNG/JPEG bytes) with
    the gaze point ``x``, ``y`` (frame pixels, origin top-left) and ``size_px`` or ``size_deg``
    with ``px_per_deg``: the server cuts the patch.

    Examples
    --------
    >>> import numpy as np
    >>> item = FixationItem("rig1", patch=np.zeros((8, 8, 3), np.uint8), seq=0, reset=True)
    >>> sorted(item.to_json("raw"))
    ['raw_b64', 'reset', 'seq', 'shape', 'stream_id']
    """

    stream_id: str
    patch: ImageLike | None = None
    frame: ImageLike | None = None
    x: float | None = None
    y: float | None = None
    size_px: int | None = None
    size_deg: float | None = None
    px_per_deg: float | None = None
    seq: int | None = None
    t: float | None = None
    duration_ms: float | None = None
    reset: bool = False
    encoding: Encoding | None = None

    def image(self, default_encoding: Encoding = "png") -> tuple[str, bytes, dict[str, Any]]:
        """Check the fields and encode the image: ``(kind, data, extra)``.

        ``kind`` is ``"patch"`` (PNG/JPEG bytes), ``"raw"`` (RGB bytes; ``extra`` holds ``shape``)
        or ``"frame"`` (PNG/JPEG bytes; ``extra`` holds the gaze point and the patch size).
        """
        encoding = self.encoding or default_encoding
        if encoding not in _ENCODINGS:
            raise errors.InputError(f"encoding must be one of {', '.join(_ENCODINGS)}, got {encoding!r}")
        if (self.patch is None) == (self.frame is None):
            raise errors.InputError("give exactly one image: patch=..., or frame=... with x, y and a size")
        gaze = {n: getattr(self, n) for n in ("x", "y", "size_px", "size_deg", "px_per_deg")}
        if self.patch is not None:
            stray = [n for n, v in gaze.items() if v is not None]
            if stray:
                raise errors.InputError(
                    f"{', '.join(stray)} only apply to a frame; remove them or send frame="
                )
            if not isinstance(self.patch, np.ndarray):
                return "patch", bytes(self.patch), {}  # already PNG/JPEG file bytes
            if encoding != "raw":
                return "patch", encode_image(self.patch, encoding), {}
            arr = _as_uint8_image(self.patch, "patch")
            if arr.ndim == 2:
                arr = np.repeat(arr[:, :, None], 3, axis=2)  # (H, W) grey -> (H, W, 3)
            return "raw", arr.tobytes(), {"shape": list(arr.shape)}
        if self.x is None or self.y is None:
            raise errors.InputError("a frame needs the gaze point x and y (frame pixels, origin top-left)")
        if self.size_px is None and (self.size_deg is None or self.px_per_deg is None):
            raise errors.InputError("a frame needs size_px, or size_deg and px_per_deg")
        assert self.frame is not None
        frame = self.frame
        if isinstance(frame, np.ndarray):
            # The API takes frames only as PNG/JPEG: raw frames would be too big to send.
            frame = encode_image(frame, "jpeg" if encoding == "jpeg" else "png", what="frame")
        return "frame", bytes(frame), {n: v for n, v in gaze.items() if v is not None}

    def meta(self) -> dict[str, Any]:
        """``seq``, ``t``, ``duration_ms`` (those given) and ``reset``."""
        out: dict[str, Any] = {
            n: getattr(self, n) for n in ("seq", "t", "duration_ms") if getattr(self, n) is not None
        }
        out["reset"] = bool(self.reset)
        return out

    def to_json(self, default_encoding: Encoding = "png", *, with_stream: bool = True) -> dict[str, Any]:
        """The JSON body of this fixation (``with_stream``: include ``stream_id``, as a batch needs)."""
        kind, data, extra = self.image(default_encoding)
        body: dict[str, Any] = {"stream_id": self.stream_id} if with_stream else {}
        body.update(self.meta())
        body[f"{kind}_b64"] = base64.b64encode(data).decode("ascii")
        body.update(extra)
        return body
