"""decode_source: every image payload becomes an input_size RGB patch, or a PatchError saying why."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from learner.errors import PatchError
from service.decode import decode_source, fit
from service.messages import PatchSource


def _png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(array, cv2.COLOR_RGB2BGR))[1].tobytes()


def test_each_kind_decodes_to_the_input_size() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    patch = frame[10:74, 20:84]
    sources = [
        PatchSource("patch", _png(patch)),
        PatchSource("raw", patch.tobytes(), shape=patch.shape),
        PatchSource("frame", _png(frame), x=52, y=42, size_px=64),
        PatchSource("frame", _png(frame), x=52, y=42, size_deg=2.0, px_per_deg=32.0),
    ]
    outs = [decode_source(s, max_pixels=10**6, size=32) for s in sources]
    for out in outs:
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # PNG is lossless and the frame cut is the same region: all four are the same patch.
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_fit_matches_the_learner_preprocess() -> None:
    import torch

    from learner.patches import preprocess

    patch = np.random.default_rng(1).integers(0, 256, (50, 50, 3), dtype=np.uint8)
    a = preprocess([patch], 32)
    b = preprocess(fit(patch, 32)[None], 32)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (PatchSource("patch", b"not an image"), "cannot decode"),
        (PatchSource("patch", b""), "empty"),
        (PatchSource("raw", bytes(10), shape=(2, 2, 3)), "length"),
        (PatchSource("raw", bytes(16), shape=(2, 2, 4)), r"3 \(RGB\) channels"),
        (PatchSource("raw", bytes(3 * 200 * 200), shape=(200, 200, 3)), "more than the limit"),
        (PatchSource("frame", _png(np.zeros((40, 40, 3), np.uint8)), x=500, y=5, size_px=8), "off the frame"),
        (
            PatchSource("frame", _png(np.zeros((300, 300, 3), np.uint8)), x=5, y=5, size_px=8),
            "more than the limit",
        ),
    ],
)
def test_bad_payloads_raise_patch_error(source: PatchSource, message: str) -> None:
    with pytest.raises(PatchError, match=message):
        decode_source(source, max_pixels=200 * 199, size=32)
