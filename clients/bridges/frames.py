"""Where a bridge's pixels come from: a still image, a video file or a camera, as time-stamped frames.

A fixation is cut from the frame shown closest to its midpoint: each source keeps the last few
frames with the time they arrived (:class:`FrameRing`) and answers :meth:`FrameSource.frame_at`.
Frames are RGB ``uint8`` (H, W, 3), like everything in :mod:`learner.patches`.

- :class:`StillFrame`: one image for every fixation (a static stimulus, tests, demos);
- :class:`CaptureFrames`: OpenCV ``VideoCapture`` read on a background thread, a video file (played
  at its own frame rate, looping by default) or a camera index (``0``); a camera that stops
  answering is reopened every second;
- the Pupil bridge fills a :class:`FrameRing` itself from Pupil Capture's ``frame.world`` messages.

Examples
--------
>>> import numpy as np
>>> ring = FrameRing(keep=2)
>>> for t in (1.0, 2.0, 3.0):
...     ring.add(t, np.full((2, 2, 3), int(t), np.uint8))
>>> int(ring.nearest(2.2)[0, 0, 0]), int(ring.nearest(None)[0, 0, 0]), len(ring)
(2, 3, 2)
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from learner.errors import InputError

__all__ = ["IMAGE_SUFFIXES", "CaptureFrames", "FrameRing", "FrameSource", "StillFrame", "open_frames"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


class FrameSource(Protocol):
    """Frames for cutting patches."""

    def frame_at(self, t: float | None) -> np.ndarray | None:
        """The frame shown closest to ``t`` (the source's clock), the newest for None; None before any."""
        ...

    def close(self) -> None:
        """Release the device or file."""
        ...


class FrameRing:
    """The last ``keep`` frames with their time stamps; thread-safe; nearest-in-time lookup.

    Frames may be stored in any form a ``decode`` callable turns into RGB (Pupil's JPEG bytes, say),
    so only the frame actually used is decoded.
    """

    def __init__(self, keep: int = 16, decode: Callable[[object], np.ndarray] | None = None) -> None:
        if keep < 1:
            raise InputError(f"the frame buffer must keep at least 1 frame, got {keep}")
        self._times: deque[float] = deque(maxlen=keep)
        self._frames: deque[object] = deque(maxlen=keep)
        self._decode = decode
        self._lock = threading.Lock()

    def add(self, t: float, frame: object) -> None:
        """Add a frame shown at ``t``; a time stamp older than the newest restarts the ring (a new clock)."""
        with self._lock:
            if self._times and t < self._times[-1]:
                self._times.clear()
                self._frames.clear()
            self._times.append(float(t))
            self._frames.append(frame)

    def clear(self) -> None:
        with self._lock:
            self._times.clear()
            self._frames.clear()

    def __len__(self) -> int:
        return len(self._times)

    def nearest(self, t: float | None) -> np.ndarray | None:
        """The frame closest to ``t`` (the newest for None), decoded; None when empty."""
        with self._lock:
            if not self._times:
                return None
            if t is None:
                item = self._frames[-1]
            else:
                times = list(self._times)
                i = bisect.bisect_left(times, t)
                if i == len(times) or (i > 0 and t - times[i - 1] <= times[i] - t):
                    i -= 1
                item = self._frames[i]
        return self._decode(item) if self._decode is not None else item  # type: ignore[return-value]


def _read_image(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f"cannot read the image {path}: give a PNG, JPEG, BMP or TIFF file")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class StillFrame:
    """The same image for every fixation.

    Parameters
    ----------
    image
        A path to an image file, or an RGB uint8 array (H, W, 3).
    """

    def __init__(self, image: str | Path | np.ndarray) -> None:
        self.frame = _read_image(Path(image)) if isinstance(image, (str, Path)) else np.asarray(image)

    def frame_at(self, t: float | None) -> np.ndarray | None:
        return self.frame

    def close(self) -> None:
        pass


class CaptureFrames:
    """Frames of a video file or a camera, read by OpenCV on a background thread.

    Parameters
    ----------
    source
        A video file path, or a camera index.
    clock
        Time stamps for arriving frames; use the eye tracker's clock (``pylsl.local_clock``).
    keep
        Frames kept for the nearest-in-time lookup.
    loop
        A video file starts again at its end (else its last frame stays).
    """

    def __init__(
        self, source: str | Path | int, clock: Callable[[], float], *, keep: int = 16, loop: bool = True
    ) -> None:
        self.source = source
        self.is_camera = isinstance(source, int)
        if not isinstance(source, int) and not Path(source).is_file():
            raise InputError(f"video file {source} not found: give a video file, an image or a camera index")
        self._clock = clock
        self._loop = loop
        self._ring = FrameRing(keep)
        self._stop = threading.Event()
        self._cap = self._open()
        self._thread = threading.Thread(target=self._run, name="frames", daemon=True)
        self._thread.start()

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(self.source if self.is_camera else str(self.source))
        if not cap.isOpened():
            raise InputError(f"OpenCV cannot open {'camera' if self.is_camera else 'video'} {self.source}")
        return cap

    def _run(self) -> None:
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        period = 1.0 / fps if (not self.is_camera and 1.0 <= fps <= 1000.0) else 0.0
        next_at = time.monotonic()
        while not self._stop.is_set():
            ok, bgr = self._cap.read()
            if not ok:
                if self.is_camera:  # unplugged or busy: try again
                    log.warning("camera %s gave no frame; reopening in 1 s", self.source)
                    self._cap.release()
                    if self._stop.wait(1.0):
                        break
                    self._cap = cv2.VideoCapture(self.source)
                    continue
                if not self._loop:
                    break
                self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                continue
            self._ring.add(self._clock(), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            if period:  # a file plays at its own pace, as it was recorded
                next_at += period
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        self._cap.release()

    def frame_at(self, t: float | None) -> np.ndarray | None:
        return self._ring.nearest(t)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


def open_frames(spec: str, clock: Callable[[], float], *, keep: int = 16) -> FrameSource:
    """Open ``--frames SPEC``: a camera index (``0``), an image file, or a video file."""
    if spec.strip().isdigit():
        return CaptureFrames(int(spec), clock, keep=keep)
    path = Path(spec).expanduser()
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return StillFrame(path)
    return CaptureFrames(path, clock, keep=keep)
