"""Turn a fixation's image payload into the uint8 RGB patch the learner takes, within the limits.

Runs off the worker's critical path: in the API process for HTTP requests (in a thread), and in
the worker's decode thread pool for messages that rigs XADD to Redis. Every failure is a
``PatchError`` (422) that says what to fix; a decoded image over ``max_pixels`` is one too.

Patches are resized to ``input_size`` here, with the same rule as ``learner.patches.preprocess``
(area averaging when shrinking, bilinear when growing), so the learner gets equal-sized patches it
stacks without copying, and messages forwarded over Redis stay small.
"""

from __future__ import annotations

import numpy as np

from learner.errors import FoveateError, InputError, PatchError
from learner.patches import as_patch, cut_patch, decode_image, patch_size_px, resize_patch
from service.messages import Fixation, PatchSource


def fit(patch: np.ndarray, size: int | None) -> np.ndarray:
    """Resize a (H, W, 3) patch to (size, size, 3) by ``preprocess``'s own rule; ``None`` keeps it."""
    return patch if size is None else resize_patch(patch, size)


#: The default largest patch side cut from a frame (``FOVEATE_MAX_PATCH_PX``).
MAX_PATCH_PX = 1024


def decode_source(
    source: PatchSource, *, max_pixels: int, size: int | None = None, max_patch_px: int = MAX_PATCH_PX
) -> np.ndarray:
    """Decode (and for a frame, cut) an image payload into an RGB uint8 patch (size, size, 3).

    Parameters
    ----------
    source
        The payload: encoded patch, raw pixels with their shape, or a frame with a gaze point.
    max_pixels
        Largest height * width accepted for a decoded image or raw array.
    size
        Side to resize the patch to (the model's ``input_size``); ``None`` keeps its size.
    max_patch_px
        Largest side of a patch cut from a frame: checked before the frame is decoded, since a
        20000 px patch of a small frame would take 1.2 GB of padding.

    Raises
    ------
    PatchError
        Undecodable bytes, wrong shape or channels, too many pixels, a gaze point off the frame.

    Examples
    --------
    >>> raw = PatchSource("raw", bytes(8 * 8 * 3), shape=(8, 8, 3))
    >>> decode_source(raw, max_pixels=1_000, size=16).shape
    (16, 16, 3)
    """
    if source.kind == "patch":
        patch = decode_image(source.data, max_pixels=max_pixels)
    elif source.kind == "raw":
        shape = source.shape
        if shape is None or len(shape) != 3:
            raise PatchError("raw pixels need their shape (H, W, 3)")
        if shape[2] != 3:
            raise PatchError(f"raw pixels must have 3 (RGB) channels, got shape {tuple(shape)}; send H,W,3")
        if shape[0] * shape[1] > max_pixels:
            raise PatchError(
                f"raw patch has {shape[0] * shape[1]} pixels, more than the limit of {max_pixels}"
            )
        patch = as_patch(source.data, shape=(shape[0], shape[1], shape[2]), max_pixels=max_pixels)
    elif source.kind == "frame":
        if source.x is None or source.y is None:
            raise PatchError("a frame needs the gaze point x and y")
        side = patch_size_px(source.size_px, source.size_deg, source.px_per_deg)
        if side > max_patch_px:
            raise PatchError(
                f"the patch to cut is {side} px wide, more than the limit of {max_patch_px} "
                "(FOVEATE_MAX_PATCH_PX); send a smaller size_px (or size_deg * px_per_deg)"
            )
        frame = decode_image(source.data, max_pixels=max_pixels)
        patch = cut_patch(
            frame, source.x, source.y, source.size_px, size_deg=source.size_deg, px_per_deg=source.px_per_deg
        )
    else:
        raise PatchError(f"unknown payload kind {source.kind!r}")
    return fit(patch, size)


def decode_fixation(fix: Fixation, *, max_pixels: int, size: int | None, max_patch_px: int) -> None:
    """Fill ``fix.patch`` from ``fix.source``, or set ``fix.problem`` (the worker's decoder, which
    runs in the broker's decode threads); the encoded bytes are dropped either way."""
    if fix.source is None:
        fix.problem = InputError("the fixation carries no image")
        return
    try:
        fix.patch = decode_source(fix.source, max_pixels=max_pixels, size=size, max_patch_px=max_patch_px)
    except FoveateError as exc:
        fix.problem = exc
    fix.source = None  # the encoded bytes are not needed any more
