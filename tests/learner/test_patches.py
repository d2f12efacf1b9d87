"""Tests for learner.patches: decoding, validating, cutting and preprocessing fixation patches."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from learner.errors import ConfigError, PatchError
from learner.patches import (
    BORDER_VALUE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_PIXELS,
    as_patch,
    cut_patch,
    decode_image,
    patch_size_px,
    preprocess,
)

OSIE_IMAGE = Path("/work/shared/data/osie/stimuli/1001.jpg")
NP_MODES: dict[str, dict[str, Any]] = {
    "reflect": {"mode": "reflect"},
    "replicate": {"mode": "edge"},
    "constant": {"constant_values": BORDER_VALUE},
}


@pytest.fixture
def frame() -> np.ndarray:
    # Distinct, non-symmetric values so that a wrong offset or mirror shows.
    return np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)


def _expected(frame: np.ndarray, x: float, y: float, size: int, border: str) -> np.ndarray:
    """The patch cut from the whole frame padded by numpy: the slow, obviously right reference."""
    padded = np.pad(frame, ((size, size), (size, size), (0, 0)), **NP_MODES[border])
    x0, y0 = math.floor(x + 0.5) - size // 2, math.floor(y + 0.5) - size // 2
    return padded[y0 + size : y0 + 2 * size, x0 + size : x0 + 2 * size]


def _encode(ext: str, image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


# --- cut_patch -------------------------------------------------------------------------------


def test_patch_inside_equals_plain_slice_and_is_a_copy(frame: np.ndarray) -> None:
    patch = cut_patch(frame, 20.2, 14.6, 9)
    np.testing.assert_array_equal(patch, frame[11:20, 16:25])  # centre (20, 15), 9 // 2 = 4
    assert patch.flags.c_contiguous and patch.dtype == np.uint8
    patch[:] = 0
    assert frame[11:20, 16:25].any()  # the caller's frame is untouched


@pytest.mark.parametrize("border", ["reflect", "replicate", "constant"])
@pytest.mark.parametrize(
    ("x", "y", "size"),
    [
        (0, 0, 9),
        (39, 29, 9),
        (39.4, 0.2, 10),
        (0, 29, 12),
        (-3, 15, 8),
        (20, 33, 8),
        (20, 15, 45),
        (1, 1, 25),
    ],
)
def test_patch_at_border_equals_padded_frame(
    frame: np.ndarray, border: str, x: float, y: float, size: int
) -> None:
    patch = cut_patch(frame, x, y, size, border=border)
    assert patch.shape == (size, size, 3)
    np.testing.assert_array_equal(patch, _expected(frame, x, y, size, border))


def test_constant_border_is_mid_grey(frame: np.ndarray) -> None:
    patch = cut_patch(frame, 0, 0, 10, border="constant")
    assert (patch[:5, :5] == BORDER_VALUE).all() and BORDER_VALUE == 128
    np.testing.assert_array_equal(patch[5:, 5:], frame[:5, :5])


@pytest.mark.parametrize("size", [7, 8])
def test_gaze_pixel_is_at_the_patch_centre(frame: np.ndarray, size: int) -> None:
    patch = cut_patch(frame, 12.5, 9.49, size)  # rounds to (13, 9): halves go up
    np.testing.assert_array_equal(patch[size // 2, size // 2], frame[9, 13])


@pytest.mark.parametrize(
    ("x", "y"), [(-4.0, 10.0), (10.0, -4.4), (44.0, 10.0), (10.0, 34.0), (-100.0, -100.0)]
)
def test_gaze_off_frame_raises(frame: np.ndarray, x: float, y: float) -> None:
    with pytest.raises(PatchError, match="off the frame"):
        cut_patch(frame, x, y, 8)  # patch spans cx-4 .. cx+3: no overlap with the 40 x 30 frame


def test_gaze_just_overlapping_frame_is_padded(frame: np.ndarray) -> None:
    patch = cut_patch(frame, -3.0, 33.0, 8, border="replicate")  # one column and one row overlap
    np.testing.assert_array_equal(patch, np.broadcast_to(frame[29, 0], (8, 8, 3)))


@pytest.mark.parametrize(("x", "y"), [(math.nan, 3.0), (3.0, math.inf)])
def test_nan_gaze_raises(frame: np.ndarray, x: float, y: float) -> None:
    with pytest.raises(PatchError, match="off the frame"):
        cut_patch(frame, x, y, 8)


def test_cut_patch_rejects_bad_border_and_frame(frame: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="border"):
        cut_patch(frame, 5, 5, 4, border="wrap")
    with pytest.raises(PatchError, match="frame"):
        cut_patch(frame[:, :, :2], 5, 5, 4)


# --- sizes in pixels and degrees ---------------------------------------------------------------


def test_patch_size_from_degrees() -> None:
    assert patch_size_px(size_deg=2.0, px_per_deg=24.6) == 49
    assert patch_size_px(size_deg=1.0, px_per_deg=32.5) == 33  # halves round up
    assert patch_size_px(50) == 50 and patch_size_px(49.5) == 50 and patch_size_px(2) == 2


def test_cut_patch_in_degrees_equals_pixels(frame: np.ndarray) -> None:
    in_deg = cut_patch(frame, 20, 15, size_deg=0.5, px_per_deg=22.0)
    np.testing.assert_array_equal(in_deg, cut_patch(frame, 20, 15, 11))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give a patch size"),
        ({"size_px": 10, "size_deg": 1.0, "px_per_deg": 10.0}, "not both"),
        ({"size_deg": 1.0}, "needs px_per_deg"),
        ({"size_deg": 1.0, "px_per_deg": 0.0}, "px_per_deg must be a positive"),
        ({"size_px": 1.4}, "at least 2"),
        ({"size_px": math.nan}, "finite"),
    ],
)
def test_patch_size_errors(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(PatchError, match=message):
        patch_size_px(**kwargs)


# --- decode_image ------------------------------------------------------------------------------


def test_decode_png_is_exact_and_rgb(frame: np.ndarray) -> None:
    decoded = decode_image(_encode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)))
    np.testing.assert_array_equal(decoded, frame)


def test_decode_jpeg_is_close_and_rgb() -> None:
    red = np.zeros((16, 24, 3), dtype=np.uint8)
    red[..., 0] = 200  # RGB red
    decoded = decode_image(_encode(".jpg", cv2.cvtColor(red, cv2.COLOR_RGB2BGR)))
    assert decoded.shape == (16, 24, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - red).max() <= 8


def test_decode_grey_and_rgba_png(frame: np.ndarray) -> None:
    grey = frame[..., 0]
    np.testing.assert_array_equal(decode_image(_encode(".png", grey)), np.repeat(grey[..., None], 3, axis=2))
    bgra = np.dstack([cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), np.full(grey.shape, 7, np.uint8)])
    np.testing.assert_array_equal(decode_image(_encode(".png", bgra)), frame)


@pytest.mark.parametrize(
    "data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"\xff\xd8\xff\xe0"]
)
def test_decode_garbage_raises(data: bytes) -> None:
    with pytest.raises(PatchError, match="PNG or JPEG"):
        decode_image(data)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_decode_refuses_too_many_pixels_before_decoding(frame: np.ndarray, ext: str) -> None:
    data = _encode(ext, frame)  # 40 x 30 = 1200 pixels, read from the header
    with pytest.raises(PatchError, match="1200 pixels"):
        decode_image(data, max_pixels=1000)
    assert decode_image(data, max_pixels=1200).shape == (30, 40, 3)


# --- as_patch ----------------------------------------------------------------------------------


def test_as_patch_accepts_and_converts(frame: np.ndarray) -> None:
    assert as_patch(frame) is frame  # already valid: no copy
    grey = frame[..., :1]
    np.testing.assert_array_equal(as_patch(grey), np.repeat(grey, 3, axis=2))
    np.testing.assert_array_equal(as_patch(np.dstack([frame, frame[..., :1]])), frame)
    np.testing.assert_array_equal(as_patch(frame.astype(np.float32) + 0.3), frame)
    np.testing.assert_array_equal(as_patch(frame.astype(np.int64)), frame)
    np.testing.assert_array_equal(as_patch(frame.tobytes(), shape=(30, 40, 3)), frame)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 4, 3, 1), np.uint8), "dimensions"),
        (np.zeros(12, np.uint8), "dimensions"),
        (np.zeros((4, 4, 2), np.uint8), "channels"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.full((4, 4, 3), 0.5, np.float64), r"\[0, 1\]"),
        (np.full((4, 4, 3), 300, np.int32), "outside 0-255"),
        (np.ones((4, 4, 3), bool), "dtype bool"),
        (np.broadcast_to(np.uint8(0), (4097, 4097, 3)), "more than the limit"),  # no memory used
    ],
)
def test_as_patch_refuses(array: np.ndarray, message: str) -> None:
    with pytest.raises(PatchError, match=message):
        as_patch(array)


def test_as_patch_limits_and_raw_bytes() -> None:
    assert MAX_PIXELS == 4096 * 4096
    with pytest.raises(PatchError, match="more than the limit of 100"):
        as_patch(np.zeros((11, 10, 3), np.uint8), max_pixels=100)
    with pytest.raises(PatchError, match="length 11"):
        as_patch(b"\x00" * 11, shape=(2, 2, 3))
    with pytest.raises(PatchError, match="need shape"):
        as_patch(b"\x00" * 12)
    with pytest.raises(PatchError, match="expected"):
        as_patch(np.zeros((2, 2, 3), np.uint8), shape=(3, 3, 3))


# --- preprocess --------------------------------------------------------------------------------


def test_imagenet_mean_colour_maps_to_zero() -> None:
    mean_rgb = np.array([round(255 * m) for m in IMAGENET_MEAN], dtype=np.uint8)
    x = preprocess([np.broadcast_to(mean_rgb, (20, 20, 3)).copy()], 32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    assert x.abs().max().item() < 0.01
    white = preprocess(np.full((2, 8, 8, 3), 255, np.uint8), 8, dtype=torch.float64)
    expected = torch.tensor(
        [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)], dtype=torch.float64
    )
    torch.testing.assert_close(white, expected.view(1, 3, 1, 1).expand(2, 3, 8, 8))


def test_preprocess_without_resize_keeps_pixels(frame: np.ndarray) -> None:
    batch = np.stack([frame[:16, :16], frame[10:26, 20:36]])  # (2, 16, 16, 3)
    x = preprocess(batch, 16)
    std, mean = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    pixels = ((x * std + mean) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    np.testing.assert_array_equal(pixels.numpy(), batch)
    # The fast path (a ready batch, numpy or torch) and the list path agree.
    torch.testing.assert_close(preprocess(list(batch), 16), x, rtol=0, atol=0)
    torch.testing.assert_close(preprocess(torch.from_numpy(batch), 16), x, rtol=0, atol=0)


def test_preprocess_resizes_mixed_sizes(frame: np.ndarray) -> None:
    patches = [frame, frame[:8, :8], np.full((50, 50, 3), 124, np.uint8)]
    x = preprocess(patches, 20)
    assert x.shape == (3, 3, 20, 20) and torch.isfinite(x).all()
    assert x[2].flatten(1).std(dim=1).max().item() < 1e-6  # a constant patch stays constant
    resized = preprocess(torch.from_numpy(np.stack([frame[:12, :12]] * 2)), 20)  # (B, 12, 12, 3) tensor
    assert resized.shape == (2, 3, 20, 20)
    assert preprocess([], 20).shape == (0, 3, 20, 20)


def test_preprocess_errors(frame: np.ndarray) -> None:
    with pytest.raises(PatchError, match="uint8"):
        preprocess(torch.zeros(1, 8, 8, 3), 8)
    with pytest.raises(PatchError, match="shape"):
        preprocess(np.zeros((8, 8, 3), np.uint8), 8)
    with pytest.raises(PatchError, match="NaN"):
        preprocess([np.full((8, 8, 3), np.nan)], 8)
    with pytest.raises(ConfigError, match="size"):
        preprocess([frame], 0)


# --- a real image and fixation -----------------------------------------------------------------


@pytest.mark.skipif(not OSIE_IMAGE.exists(), reason="OSIE data not present")
def test_real_osie_image_and_fixation() -> None:
    image = decode_image(OSIE_IMAGE.read_bytes())
    assert image.shape == (600, 800, 3)
    bgr = cv2.imread(str(OSIE_IMAGE))
    assert bgr is not None
    np.testing.assert_array_equal(image, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    patch = cut_patch(image, 395.5, 265.7, 50)  # subject 1's first fixation on 1001.jpg
    np.testing.assert_array_equal(patch, image[241:291, 371:421])  # centre (396, 266)
    x = preprocess([patch], 64)
    assert x.shape == (1, 3, 64, 64) and torch.isfinite(x).all() and x.std().item() > 0.05
