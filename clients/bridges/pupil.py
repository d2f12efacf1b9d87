"""``foveate bridge pupil``: fixations and world frames from Pupil Capture's network API, to a server.

Pupil Capture (Pupil Labs, Pupil Core) publishes its data over ZeroMQ:

1. *Pupil Remote*, a REQ/REP socket (default port 50020), answers the request ``SUB_PORT`` with
   the port of the data publisher;
2. a SUB socket on that port receives multipart messages ``[topic, msgpack payload, *extra
   frames]``; an extra frame carries raw bytes (an image) that the payload does not contain.

Two topics are read:

``fixations``
    from Capture's online fixation detector (the "Fixation Detector" plugin must be running):
    ``id``, ``timestamp`` (onset, Pupil time, s), ``duration`` (ms), ``norm_pos`` ``[x, y]``
    (fractions of the world image, origin **bottom-left**), ``confidence``, ``dispersion``.
    The online detector re-publishes a fixation while it lasts, each time over its most recent
    window, with the same ``id``; the messages of one ``id`` are merged (onset = earliest
    ``timestamp``, end = latest ``timestamp + duration``, position = mean ``norm_pos``), and the
    fixation is posted once a message of another ``id`` arrives or none came for
    ``merge_timeout_s``.
``frame.world``
    from the "Frame Publisher" plugin, which must be enabled (format BGR, JPEG or gray; YUV is
    not read): ``format``, ``width``, ``height``, ``timestamp``, and the image in the third message
    frame (``__raw_data__``).

Each fixation is paired with the world frame closest to its midpoint (frames kept: ``keep``),
mapped to pixels ``x = nx * W``, ``y = (1 - ny) * H``, cut and posted. With ``frames`` given
(``--frames``: a still image or a video) the newest frame of that source is used instead and
``frame.world`` is not subscribed to.

A Capture that goes silent for ``silence_timeout_s`` is asked for its SUB port again: if it moved
(Capture restarted) or Remote does not answer (Capture down), the bridge reconnects as soon as it
can; sequence numbers go on where they were.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import cv2
import msgpack
import numpy as np
import zmq

from clients.bridges.common import FixationPoster
from clients.bridges.frames import FrameRing, FrameSource
from learner.errors import ConfigError, PatchError
from learner.patches import cut_patch

__all__ = ["PupilBridge", "PupilConfig", "decode_world_frame"]

log = logging.getLogger(__name__)

_RawFrame = tuple[str, int, int, bytes]  # (format, width, height, image bytes)


def decode_world_frame(raw: _RawFrame) -> np.ndarray:
    """Turn a ``frame.world`` image (``bgr``, ``rgb``, ``gray`` or ``jpeg``) into RGB uint8 (H, W, 3)."""
    fmt, width, height, data = raw
    if fmt == "jpeg":
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise PatchError(f"cannot decode a {width} x {height} JPEG world frame ({len(data)} bytes)")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    channels = {"bgr": 3, "rgb": 3, "gray": 1}.get(fmt)
    if channels is None:
        raise PatchError(
            f"world frames in format {fmt!r} are not read: set the Frame Publisher to BGR or JPEG"
        )
    if len(data) != width * height * channels:
        raise PatchError(
            f"a {fmt} world frame of {width} x {height} needs {width * height * channels} bytes, "
            f"got {len(data)}"
        )
    image = np.frombuffer(data, np.uint8).reshape(height, width, channels)
    if fmt == "gray":
        return np.repeat(image, 3, axis=2)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if fmt == "bgr" else image.copy()


@dataclass(frozen=True)
class PupilConfig:
    """Where Pupil Capture is and how long to wait for it (see the module docstring)."""

    host: str = "127.0.0.1"
    port: int = 50020
    fixation_topic: str = "fixations"
    frame_topic: str = "frame.world"
    silence_timeout_s: float = 5.0
    request_timeout_s: float = 2.0
    merge_timeout_s: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"Pupil Remote port must be 1-65535, got {self.port}")
        for name in ("silence_timeout_s", "request_timeout_s", "merge_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


class _Pending:
    """The messages of one fixation id, merged."""

    def __init__(self, fid: Any, onset: float, end: float, nx: float, ny: float) -> None:
        self.fid, self.onset, self.end = fid, onset, end
        self.sx, self.sy, self.n = nx, ny, 1
        self.updated = time.monotonic()

    def add(self, onset: float, end: float, nx: float, ny: float) -> None:
        self.onset, self.end = min(self.onset, onset), max(self.end, end)
        self.sx += nx
        self.sy += ny
        self.n += 1
        self.updated = time.monotonic()


class PupilBridge:
    """Subscribes to Pupil Capture and posts its fixations.

    Parameters
    ----------
    config
        Where Pupil Remote is.
    poster
        Numbers and delivers the fixations.
    frames
        Optional: cut patches from this source's newest frame instead of Capture's world frames.
    keep
        World frames kept for pairing with fixations.
    size_px, size_deg, px_per_deg
        Patch side: pixels, or degrees with pixels per degree (as :func:`learner.patches.cut_patch`).
    """

    def __init__(
        self,
        config: PupilConfig,
        poster: FixationPoster,
        *,
        frames: FrameSource | None = None,
        keep: int = 16,
        size_px: float | None = None,
        size_deg: float | None = None,
        px_per_deg: float | None = None,
    ) -> None:
        self.config = config
        self.poster = poster
        self.frames = frames
        self.world = FrameRing(keep, decode=decode_world_frame)  # type: ignore[arg-type]
        self._patch: dict[str, Any] = {"size_px": size_px, "size_deg": size_deg, "px_per_deg": px_per_deg}
        self._pending: _Pending | None = None
        self._ctx = zmq.Context()
        self.messages = 0
        self._bad_formats: set[str] = set()

    # ---------------------------------------------------------------- connection

    def _ask_sub_port(self) -> str | None:
        """Ask Pupil Remote for the SUB port; None when it does not answer in time."""
        req = self._ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        try:
            req.connect(f"tcp://{self.config.host}:{self.config.port}")
            req.send_string("SUB_PORT")
            if req.poll(int(self.config.request_timeout_s * 1000)) == 0:
                return None
            answer = req.recv_string().strip()
        finally:
            req.close()  # a REQ socket without its answer cannot be reused
        if not answer.isdigit():
            raise ConfigError(
                f"Pupil Remote at {self.config.host}:{self.config.port} answered {answer!r} to SUB_PORT"
            )
        return answer

    def _subscribe(self, port: str) -> zmq.Socket[Any]:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(f"tcp://{self.config.host}:{port}")
        sub.setsockopt_string(zmq.SUBSCRIBE, self.config.fixation_topic)
        if self.frames is None:
            sub.setsockopt_string(zmq.SUBSCRIBE, self.config.frame_topic)
        return sub

    def run(self, stop: threading.Event) -> None:
        """Read until ``stop`` is set, reconnecting whenever Capture goes away or moves."""
        connected_before = False
        waiting_since = time.monotonic()
        logged = 0.0
        try:
            while not stop.is_set():
                port = self._ask_sub_port()
                if port is None:
                    waited = time.monotonic() - waiting_since
                    if waited - logged >= 10.0:
                        logged = waited
                        log.info("waiting for Pupil Remote at %s:%d (%.0f s so far)", self.config.host,
                                 self.config.port, waited)  # fmt: skip
                    stop.wait(0.5)
                    continue
                if connected_before:
                    self.poster.source_restarted()
                connected_before = True
                log.info("subscribed to Pupil Capture at %s, data port %s", self.config.host, port)
                sub = self._subscribe(port)
                try:
                    self._pump(sub, port, stop)
                finally:
                    sub.close()
                self._finish_pending()
                self.world.clear()  # a restarted Capture has a new clock
                waiting_since, logged = time.monotonic(), 0.0
            self._finish_pending()
        finally:
            self._ctx.term()

    def _pump(self, sub: zmq.Socket[Any], port: str, stop: threading.Event) -> None:
        """Receive until ``stop``, or until Capture is gone or moved to another port."""
        last_message = time.monotonic()
        while not stop.is_set():
            if sub.poll(50):
                while True:
                    try:
                        parts = sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_message(parts)
                last_message = time.monotonic()
                continue
            pending = self._pending
            if pending is not None and time.monotonic() - pending.updated > self.config.merge_timeout_s:
                self._finish_pending()
            if time.monotonic() - last_message > self.config.silence_timeout_s:
                answer = self._ask_sub_port()
                if answer != port:
                    log.warning(
                        "Pupil Capture %s; reconnecting", "moved to port " + answer if answer else "is gone"
                    )
                    return
                last_message = time.monotonic()  # alive, just quiet (nobody looking?)

    # ---------------------------------------------------------------- messages

    def _on_message(self, parts: list[bytes]) -> None:
        if len(parts) < 2:
            log.debug("ignored a message of %d frame(s)", len(parts))
            return
        self.messages += 1
        topic = parts[0].decode("utf-8", "replace")
        payload = msgpack.unpackb(parts[1], raw=False)
        if not isinstance(payload, dict):
            return
        if topic.startswith(self.config.frame_topic):
            self._on_frame(payload, parts[2:])
        elif topic.startswith(self.config.fixation_topic):
            self._on_fixation(payload)

    def _on_frame(self, payload: dict[str, Any], extra: list[bytes]) -> None:
        raw = extra[0] if extra else (payload.get("__raw_data__") or [None])[0]
        fmt = str(payload.get("format", ""))
        if raw is None or fmt not in ("bgr", "rgb", "gray", "jpeg"):
            if fmt not in self._bad_formats:
                self._bad_formats.add(fmt)
                log.warning(
                    "world frames in format %r cannot be used: set the Frame Publisher to BGR or JPEG", fmt
                )
            return
        try:
            size = (int(payload["width"]), int(payload["height"]))
            self.world.add(float(payload["timestamp"]), (fmt, *size, bytes(raw)))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignored a world frame without timestamp, width or height: %r", exc)

    def _on_fixation(self, payload: dict[str, Any]) -> None:
        try:
            onset = float(payload["timestamp"])
            end = onset + float(payload["duration"]) / 1000.0
            nx, ny = (float(v) for v in payload["norm_pos"])
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignored a fixation message without timestamp, duration or norm_pos: %r", exc)
            return
        fid = payload.get("id")
        pending = self._pending
        # Same id and not back in time (a restarted Capture counts ids from 0 again): the same fixation.
        if pending is not None and fid is not None and fid == pending.fid and onset >= pending.onset - 1.0:
            pending.add(onset, end, nx, ny)
            return
        self._finish_pending()
        self._pending = _Pending(fid, onset, end, nx, ny)

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        midpoint = 0.5 * (pending.onset + pending.end)
        nx, ny = pending.sx / pending.n, pending.sy / pending.n
        try:
            frame = self.frames.frame_at(None) if self.frames is not None else self.world.nearest(midpoint)
            if frame is None:
                log.warning("a fixation came before any world frame: is Capture's Frame Publisher enabled?")
                self.poster.skip("no world frame")
                return
            height, width = frame.shape[:2]
            x, y = nx * width, (1.0 - ny) * height  # norm_pos has its origin at the bottom-left
            patch = cut_patch(frame, x, y, **self._patch)
        except PatchError as exc:
            log.debug("fixation at norm_pos (%.3f, %.3f) skipped: %s", nx, ny, exc)
            self.poster.skip("gaze off the frame" if "off the frame" in str(exc) else "bad world frame")
            return
        self.poster.submit(
            t=pending.onset, duration_ms=(pending.end - pending.onset) * 1000.0, x=x, y=y, patch=patch
        )
