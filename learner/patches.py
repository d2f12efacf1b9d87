"""Fixation patches: decode images, cut a square patch around a gaze point, and preprocess.

A patch is an RGB ``uint8`` array of shape (P, P, 3). ``cut_patch`` takes it from a full frame
(OpenCV, padding only the small region it needs, so 4K frames are cheap), ``preprocess`` turns a
batch of patches into the normalised float tensor (B, 3, P, P) that the trunk expects.

Coordinates are pixels with the origin at the top-left corner, x to the right and y down, as eye
trackers report them on a screen or image.

Example
-------
>>> import numpy as np
>>> frame = np.zeros((600, 800, 3), dtype=np.uint8)
>>> patch = cut_patch(frame, 395.5, 265.7, 50)
>>> patch.shape
(50, 50, 3)
>>> preprocess([patch], 64).shape
torch.Size([1, 3, 64, 64])
"""

from __future__ import annotations

import io
import math
import warnings
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from PIL import Image

from learner.errors import ConfigError, PatchError

if TYPE_CHECKING:
    import torch

#: Largest image (height * width) accepted as a patch or frame; 4096 x 4096 covers 4K video.
MAX_PIXELS = 4096 * 4096

#: Grey value used for ``border="constant"``: mid-grey, close to the ImageNet mean colour, so the
#: padding normalises to about zero and adds little signal to the trunk's features.
BORDER_VALUE = 128

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB
IMAGENET_STD = (0.229, 0.224, 0.225)  # RGB

# "reflect" mirrors without repeating the edge pixel (numpy's "reflect", OpenCV's REFLECT_101).
_BORDERS = {
    "reflect": cv2.BORDER_REFLECT_101,
    "replicate": cv2.BORDER_REPLICATE,
    "constant": cv2.BORDER_CONSTANT,
}
_ACCEPTED_IMAGES = "PNG or JPEG file bytes (8-bit grey, RGB or RGBA)"


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode PNG or JPEG bytes to an RGB ``uint8`` array (H, W, 3).

    Grey images are repeated to 3 channels; an alpha channel is dropped; 16-bit samples keep their
    high byte. Only PNG and JPEG are accepted, which keeps the decoders reachable from the network few.

    The size is read from the header by the decoder itself (Pillow, which then allocates exactly
    that size and decodes into it), so the pixel limit is enforced before any pixel is decoded: a
    header that hides its size from a simpler parser (a stray byte after a JPEG's APP0 segment,
    which libjpeg skips) cannot make a huge image decode.

    Raises
    ------
    PatchError
        The bytes are empty, not PNG/JPEG, corrupt or truncated, or the image has more than
        ``max_pixels``.
    """
    data = bytes(data)
    if not data:
        raise PatchError(f"empty image: send {_ACCEPTED_IMAGES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
    except Image.DecompressionBombError as exc:
        raise PatchError(f"image has too many pixels ({exc}); the limit is {max_pixels}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise PatchError(
            f"cannot decode image ({len(data)} bytes, unknown format or corrupt header: {exc}): send "
            f"{_ACCEPTED_IMAGES}"
        ) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise PatchError(
                f"image is {width} x {height} = {width * height} pixels, more than the limit of "
                f"{max_pixels}; send a smaller one"
            )
        if width == 0 or height == 0:
            raise PatchError(f"image is empty ({width} x {height}): send {_ACCEPTED_IMAGES}")
        try:
            image.load()  # allocates width * height for the mode read from the header, then decodes
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: the high byte, as OpenCV
                grey = (np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            out = np.asarray(rgb)
        except (OSError, SyntaxError, ValueError) as exc:
            raise PatchError(
                f"cannot decode image ({len(data)} bytes, corrupt or truncated: {exc}): "
                f"send {_ACCEPTED_IMAGES}"
            ) from None
    if out.shape != (height, width, 3) or out.dtype != np.uint8:
        raise PatchError(f"cannot decode image: decoded shape {out.shape}, send {_ACCEPTED_IMAGES}")
    return out


def _to_rgb_uint8(array: Any, max_pixels: int, what: str) -> np.ndarray:
    """Validate an image array and convert it to RGB uint8, without copying when already valid."""
    arr = np.asarray(array)
    if arr.ndim == 2:  # (H, W) grey
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise PatchError(f"{what} must have shape (H, W, 3), got {arr.ndim} dimensions {arr.shape}")
    h, w, c = arr.shape
    if c not in (1, 3, 4):
        raise PatchError(f"{what} must have 3 (RGB) channels (1 or 4 are converted), got shape {arr.shape}")
    if h == 0 or w == 0:
        raise PatchError(f"{what} is empty: shape {arr.shape}")
    if h * w > max_pixels:
        raise PatchError(f"{what} has {h * w} pixels ({h} x {w}), more than the limit of {max_pixels}")
    if arr.dtype != np.uint8:
        arr = _convert_dtype(arr, what)
    if c == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif c == 4:
        arr = arr[:, :, :3]
    return arr


def _convert_dtype(arr: np.ndarray, what: str) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise PatchError(f"{what} contains NaN or infinite values")
        if arr.size and float(arr.max()) <= 1.0 and not np.all(arr == np.round(arr)):
            raise PatchError(f"{what} looks scaled to [0, 1]: float images must be on the 0-255 scale")
        rounded: np.ndarray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return rounded
    if np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
            raise PatchError(f"{what} of dtype {arr.dtype} has values outside 0-255")
        return arr.astype(np.uint8)
    raise PatchError(f"{what} must be uint8 (or finite float on the 0-255 scale), got dtype {arr.dtype}")


def as_patch(
    array: np.ndarray | bytes | bytearray | memoryview,
    *,
    shape: tuple[int, int, int] | None = None,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Validate a patch and return it as a C-contiguous RGB ``uint8`` array (H, W, 3).

    Parameters
    ----------
    array
        A numpy array (H, W, 3); (H, W) or (H, W, 1) grey is repeated to 3 channels, (H, W, 4)
        loses its alpha. Other integer dtypes must lie in 0-255; float arrays must be finite and
        on the 0-255 scale (rounded and clipped). Or raw pixel bytes, in which case ``shape``
        is required (PNG/JPEG bytes go through :func:`decode_image` instead).
    shape
        (H, W, C) of raw bytes, which must be exactly H * W * C long.
    max_pixels
        Largest H * W accepted.

    Raises
    ------
    PatchError
        Wrong shape, channels or dtype, NaN/inf, empty, too many pixels, or bytes of the wrong length.
    """
    if isinstance(array, (bytes, bytearray, memoryview)):
        if shape is None:
            raise PatchError("raw patch bytes need shape=(H, W, 3); for PNG/JPEG bytes use decode_image")
        if len(shape) != 3 or any(int(s) < 0 for s in shape):
            raise PatchError(f"shape of raw patch bytes must be (H, W, 3), got {shape}")
        expected = int(shape[0]) * int(shape[1]) * int(shape[2])
        if len(array) != expected:
            raise PatchError(
                f"raw patch bytes have length {len(array)}, shape {tuple(shape)} needs {expected}"
            )
        array = np.frombuffer(bytes(array), dtype=np.uint8).reshape(tuple(int(s) for s in shape))
    elif shape is not None and tuple(np.shape(array)) != tuple(shape):
        raise PatchError(f"patch has shape {np.shape(array)}, expected {tuple(shape)}")
    return np.ascontiguousarray(_to_rgb_uint8(array, max_pixels, "patch"))


def patch_size_px(
    size_px: float | None = None, size_deg: float | None = None, px_per_deg: float | None = None
) -> int:
    """Side of a patch in pixels, given in pixels or in degrees of visual angle.

    Give either ``size_px`` or both ``size_deg`` and ``px_per_deg``. The result is rounded
    (halves up) and must be at least 2.

    >>> patch_size_px(size_deg=2.0, px_per_deg=24.6)
    49
    """
    if size_px is not None:
        if size_deg is not None or px_per_deg is not None:
            raise PatchError("give the patch size either as size_px or as size_deg with px_per_deg, not both")
        value = float(size_px)
        source = f"size_px={size_px}"
    elif size_deg is not None and px_per_deg is not None:
        if not (math.isfinite(float(px_per_deg)) and float(px_per_deg) > 0):
            raise PatchError(f"px_per_deg must be a positive number, got {px_per_deg}")
        value = float(size_deg) * float(px_per_deg)
        source = f"size_deg={size_deg} * px_per_deg={px_per_deg}"
    elif size_deg is not None:
        raise PatchError("size_deg needs px_per_deg (pixels per degree of visual angle) to convert to pixels")
    else:
        raise PatchError("give a patch size: size_px, or size_deg with px_per_deg")
    if not math.isfinite(value):
        raise PatchError(f"patch size must be finite, got {source}")
    size = math.floor(value + 0.5)
    if size < 2:
        raise PatchError(f"patch size must be at least 2 px, got {source} = {value:g} px")
    return int(size)


def cut_patch(
    frame: np.ndarray,
    x: float,
    y: float,
    size_px: float | None = None,
    *,
    size_deg: float | None = None,
    px_per_deg: float | None = None,
    border: str = "reflect",
) -> np.ndarray:
    """Cut a square RGB patch (S, S, 3) centred on the gaze point (x, y) of a frame (H, W, 3).

    The centre is rounded to the nearest pixel (halves up); the patch covers columns
    ``cx - S // 2 ... cx - S // 2 + S - 1`` (and likewise rows), so for even S the centre is
    the pixel at index S // 2. Where the patch crosses the frame's edge it is padded:

    - ``reflect``: mirror without repeating the edge pixel (numpy ``reflect``), the default;
    - ``replicate``: repeat the edge pixel;
    - ``constant``: mid-grey :data:`BORDER_VALUE` (128).

    Only the region the patch needs is padded, never the whole frame.

    Raises
    ------
    PatchError
        Bad frame, bad size, NaN/inf gaze, or a gaze so far off the frame that the patch
        does not overlap it (centre more than S/2 beyond an edge).
    ConfigError
        Unknown ``border``.

    >>> import numpy as np
    >>> cut_patch(np.zeros((10, 10, 3), np.uint8), 0, 0, 4, border="constant")[0, 0]
    array([128, 128, 128], dtype=uint8)
    """
    if border not in _BORDERS:
        raise ConfigError(f"border must be one of {sorted(_BORDERS)}, got {border!r}")
    size = patch_size_px(size_px, size_deg, px_per_deg)
    img = _to_rgb_uint8(frame, MAX_PIXELS, "frame")
    if not (math.isfinite(float(x)) and math.isfinite(float(y))):
        raise PatchError(f"gaze is off the frame: coordinates must be finite, got x={x}, y={y}")
    h, w = img.shape[:2]
    cx, cy = math.floor(float(x) + 0.5), math.floor(float(y) + 0.5)
    x0, y0 = cx - size // 2, cy - size // 2
    x1, y1 = x0 + size, y0 + size
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        raise PatchError(
            f"gaze is off the frame: ({x}, {y}) is more than half the patch size ({size} px) beyond "
            f"the {w} x {h} frame; drop this sample or send frame coordinates (origin top-left)"
        )
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        return np.ascontiguousarray(img[y0:y1, x0:x1])  # copy: never alias the caller's frame
    left, right, top, bottom = max(0, -x0), max(0, x1 - w), max(0, -y0), max(0, y1 - h)
    # The frame region under the patch; for reflect it must also hold the mirrored source pixels,
    # which lie up to `pad` pixels inside the edge.
    rx0, rx1, ry0, ry1 = max(0, x0), min(w, x1), max(0, y0), min(h, y1)
    if border == "reflect":
        rx1, ry1 = max(rx1, min(w, left + 1)), max(ry1, min(h, top + 1))
        rx0, ry0 = min(rx0, max(0, w - 1 - right)), min(ry0, max(0, h - 1 - bottom))
    padded = cv2.copyMakeBorder(
        img[ry0:ry1, rx0:rx1], top, bottom, left, right, _BORDERS[border], value=(BORDER_VALUE,) * 3
    )
    # padded[j] holds frame row j - top + ry0 (columns likewise); take frame rows y0..y1.
    j, i = y0 + top - ry0, x0 + left - rx0
    return np.ascontiguousarray(padded[j : j + size, i : i + size])


def resize_patch(patch: np.ndarray, size: int) -> np.ndarray:
    """Resize a (H, W, 3) patch to (size, size, 3) with the rule ``preprocess`` uses; as is if equal."""
    h, w = patch.shape[:2]
    if h == size and w == size:
        return patch
    # INTER_AREA averages when shrinking (no aliasing); it degrades to nearest-like when growing.
    interp = cv2.INTER_AREA if (h >= size and w >= size) else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(patch, (size, size), interpolation=interp))


def preprocess(
    patches: Any, size: int, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Resize patches to ``size`` x ``size`` and normalise them with the ImageNet mean and std.

    Parameters
    ----------
    patches
        A list of RGB uint8 arrays (H, W, 3) of any sizes, or a uint8 numpy array or torch
        tensor (B, H, W, 3). A batch already of side ``size`` goes straight to torch.
    size
        P, the side of the output.
    device, dtype
        Where and in which float type (default ``torch.float32``) the result lives.

    Returns
    -------
    torch.Tensor
        Contiguous (B, 3, P, P).
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ConfigError(f"preprocess dtype must be a floating point type, got {dtype}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"preprocess size must be a positive integer, got {size!r}")
    size = int(size)
    batch: torch.Tensor | None = None  # (B, P, P, 3) uint8
    items: list[Any] = []
    if isinstance(patches, torch.Tensor):
        if patches.dtype != torch.uint8 or patches.ndim != 4 or patches.shape[-1] != 3:
            raise PatchError(
                f"a patch tensor must be uint8 (B, H, W, 3), got {patches.dtype} {tuple(patches.shape)}"
            )
        if patches.shape[1:3] == (size, size):
            batch = patches
        else:
            items = list(patches.cpu().numpy())
    elif isinstance(patches, np.ndarray):
        if patches.ndim != 4:
            raise PatchError(f"a patch batch must have shape (B, H, W, 3), got {patches.shape}")
        if patches.dtype == np.uint8 and patches.shape[1:] == (size, size, 3):
            arr = np.ascontiguousarray(patches)
            batch = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        else:
            items = list(patches)
    elif isinstance(patches, (list, tuple)):
        items = list(patches)
    else:
        raise PatchError(
            f"patches must be a list of (H, W, 3) arrays or a (B, H, W, 3) batch, got {type(patches)}"
        )
    if batch is None:
        if not items:
            return torch.empty((0, 3, size, size), device=device, dtype=dtype)
        batch = torch.from_numpy(np.stack([resize_patch(as_patch(p), size) for p in items]))
    # (x / 255 - mean) / std == x * scale - shift: one fused pass, on the target device.
    scale = torch.tensor([1.0 / (255.0 * s) for s in IMAGENET_STD], dtype=dtype, device=device)
    shift = torch.tensor(
        [m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)], dtype=dtype, device=device
    )
    x = batch.to(device=device).permute(0, 3, 1, 2).to(dtype)  # (B, 3, P, P)
    x = torch.addcmul(-shift.view(1, 3, 1, 1), x, scale.view(1, 3, 1, 1))  # (B, 3, P, P)
    return x.contiguous()
