"""``foveate bridge lsl``: fixations from a Lab Streaming Layer stream, patches from frames, to a server.

Two kinds of LSL stream are read (resolved by ``name`` and/or ``type``):

``gaze``
    Raw gaze samples, one per LSL sample: channels x, y and optionally a confidence (by default
    channels 0, 1; ``channels=(1, 2, 0)`` picks x = 1, y = 2, confidence = 0). They go through a
    fixation detector (:mod:`clients.gaze`: I-VT or I-DT) and each detected fixation is posted.
``fixations``
    Fixations already detected by the tracker's software: one LSL sample per fixation, channels x,
    y and duration in milliseconds (by default 0, 1, 2), time-stamped at the fixation's onset.

Coordinates are frame pixels (origin top-left) by default; ``units="norm"`` reads them as fractions
of the frame's width and height, with the origin at the top-left or, ``origin="bottom-left"``, at
the bottom-left (Pupil's convention). The patch is cut from the frame (:mod:`clients.bridges.frames`)
shown closest to the fixation's midpoint: LSL time stamps are mapped onto this machine's LSL clock
(``proc_clocksync``), the clock the frames are stamped with.

Losing the stream (the outlet closed, its program or machine restarted; or, for gaze, no sample for
``source_timeout_s``) is not an error: the open fixation is flushed, the stream is resolved again,
and sequence numbers go on where they were. The server side (retries, backlog) is
:class:`~clients.bridges.common.FixationPoster`'s.

Which network LSL uses is liblsl's configuration (``LSLAPICFG``, ``lsl_api.cfg``); see
``docs/bridges.md``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import pylsl
from pylsl.util import LostError
from pylsl.util import TimeoutError as LslTimeout

from clients.bridges.common import FixationPoster
from clients.bridges.frames import FrameSource
from clients.gaze import FixationDetector
from learner.errors import ConfigError, PatchError
from learner.patches import cut_patch

__all__ = ["LslBridge", "LslConfig"]

log = logging.getLogger(__name__)

StreamKind = Literal["gaze", "fixations"]


@dataclass(frozen=True)
class LslConfig:
    """Which LSL stream to read and how to read it (see the module docstring).

    Attributes
    ----------
    name, type
        Resolve the stream by its name and/or its content type (at least one).
    kind
        ``"gaze"`` (raw samples, detected here) or ``"fixations"`` (one sample per fixation).
    channels
        Channel indices: gaze ``(x, y)`` or ``(x, y, confidence)``; fixations ``(x, y, duration_ms)``.
        None: ``(0, 1)`` for gaze, ``(0, 1, 2)`` for fixations.
    units, origin
        ``"px"`` (frame pixels) or ``"norm"`` (fractions of the frame); origin of y for ``"norm"``.
    resolve_timeout_s
        How long one attempt to find the stream waits.
    source_timeout_s
        Gaze only: no sample for this long means the source is gone (0: wait forever).
    """

    name: str | None = None
    type: str | None = None
    kind: StreamKind = "gaze"
    channels: tuple[int, ...] | None = None
    units: Literal["px", "norm"] = "px"
    origin: Literal["top-left", "bottom-left"] = "top-left"
    resolve_timeout_s: float = 1.0
    source_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.name and not self.type:
            raise ConfigError("give the LSL stream's --name or --type (or both) to resolve it")
        for label, value in (("name", self.name), ("type", self.type)):
            if value is not None and "'" in value:
                raise ConfigError(f"the LSL stream {label} must not contain a single quote: {value!r}")
        if self.kind not in ("gaze", "fixations"):
            raise ConfigError(f"kind must be 'gaze' or 'fixations', got {self.kind!r}")
        if self.units not in ("px", "norm") or self.origin not in ("top-left", "bottom-left"):
            raise ConfigError("units must be 'px' or 'norm', origin 'top-left' or 'bottom-left'")
        need = (2, 3) if self.kind == "gaze" else (3,)
        if self.channels is not None and (len(self.channels) not in need or min(self.channels) < 0):
            what = "x,y or x,y,confidence" if self.kind == "gaze" else "x,y,duration_ms"
            raise ConfigError(
                f"channels for a {self.kind} stream are {what} (indices >= 0), got {self.channels}"
            )

    @property
    def predicate(self) -> str:
        """The XPath predicate that resolves the stream."""
        parts = [f"{key}='{value}'" for key, value in (("name", self.name), ("type", self.type)) if value]
        return " and ".join(parts)

    @property
    def channel_map(self) -> tuple[int, ...]:
        if self.channels is not None:
            return self.channels
        return (0, 1) if self.kind == "gaze" else (0, 1, 2)


class LslBridge:
    """Reads one LSL stream and posts its fixations.

    Parameters
    ----------
    config
        The stream to read.
    poster
        Numbers and delivers the fixations.
    frames
        Where patches are cut from.
    detector
        Required for a gaze stream: turns samples into fixations.
    size_px, size_deg, px_per_deg
        Patch side: pixels, or degrees with pixels per degree (as :func:`learner.patches.cut_patch`).
    """

    def __init__(
        self,
        config: LslConfig,
        poster: FixationPoster,
        frames: FrameSource,
        *,
        detector: FixationDetector | None = None,
        size_px: float | None = None,
        size_deg: float | None = None,
        px_per_deg: float | None = None,
    ) -> None:
        if config.kind == "gaze" and detector is None:
            raise ConfigError("a gaze stream needs a fixation detector (--detector ivt|idt and --px-per-deg)")
        self.config = config
        self.poster = poster
        self.frames = frames
        self.detector = detector
        self._patch: dict[str, Any] = {"size_px": size_px, "size_deg": size_deg, "px_per_deg": px_per_deg}
        self._frame_size: tuple[int, int] | None = None  # (W, H), for normalised coordinates
        self.samples = 0

    # ---------------------------------------------------------------- connection

    def run(self, stop: threading.Event) -> None:
        """Read until ``stop`` is set, finding the stream again whenever it is lost."""
        connected_before = False
        while not stop.is_set():
            inlet = self._connect(stop)
            if inlet is None:
                break
            if connected_before:
                self.poster.source_restarted()
            connected_before = True
            try:
                self._pump(inlet, stop)
            except LostError:
                log.warning("LSL stream %s lost; resolving it again", self.config.predicate)
            finally:
                inlet.close_stream()
            self._flush()  # the fixation open when the source went away is a real one
        self._flush()

    def _connect(self, stop: threading.Event) -> pylsl.StreamInlet | None:
        """Resolve the stream and open an inlet; None if ``stop`` was set first."""
        waiting_since = time.monotonic()
        logged = 0.0
        while not stop.is_set():
            found = pylsl.resolve_bypred(self.config.predicate, 1, self.config.resolve_timeout_s)
            if found:
                info = found[0]
                self._check_channels(info)
                # recover=False: a lost outlet raises LostError at once instead of being waited for.
                inlet = pylsl.StreamInlet(
                    info, max_buflen=60, recover=False, processing_flags=pylsl.proc_clocksync
                )
                try:
                    inlet.open_stream(timeout=5.0)
                except (LostError, LslTimeout):
                    log.info("LSL stream %r went away while connecting; resolving again", info.name())
                    continue
                log.info(
                    "reading LSL stream %r (type %r, %d channels, %g Hz) from %s",
                    *(info.name(), info.type(), info.channel_count(), info.nominal_srate(), info.hostname()),
                )
                return inlet
            waited = time.monotonic() - waiting_since
            if waited - logged >= 10.0:
                logged = waited
                log.info("waiting for an LSL stream with %s (%.0f s so far)", self.config.predicate, waited)
        return None

    def _check_channels(self, info: pylsl.StreamInfo) -> None:
        count = int(info.channel_count())
        if max(self.config.channel_map) >= count:
            raise ConfigError(
                f"LSL stream {info.name()!r} has {count} channels, but channels {self.config.channel_map} "
                "were asked for; pass --channels with indices below the channel count"
            )

    def _pump(self, inlet: pylsl.StreamInlet, stop: threading.Event) -> None:
        """Pull samples until ``stop``, or until a gaze stream has been silent too long."""
        last_data = time.monotonic()
        timeout = self.config.source_timeout_s if self.config.kind == "gaze" else 0.0
        while not stop.is_set():
            chunk, stamps = inlet.pull_chunk(timeout=0.0, max_samples=1024)
            if stamps:
                last_data = time.monotonic()
                for sample, stamp in zip(chunk, stamps, strict=True):
                    self._on_sample(float(stamp), sample)
                continue
            if timeout > 0 and time.monotonic() - last_data > timeout:
                log.warning("no gaze sample for %.1f s; resolving the LSL stream again", timeout)
                return
            stop.wait(0.005)

    # ---------------------------------------------------------------- samples to fixations

    def _to_pixels(self, x: float, y: float) -> tuple[float, float] | None:
        if self.config.units == "px":
            return x, y
        if self._frame_size is None:
            frame = self.frames.frame_at(None)
            if frame is None:
                return None
            self._frame_size = (int(frame.shape[1]), int(frame.shape[0]))
        width, height = self._frame_size
        return x * width, (1.0 - y if self.config.origin == "bottom-left" else y) * height

    def _on_sample(self, stamp: float, sample: list[float]) -> None:
        self.samples += 1
        idx = self.config.channel_map
        point = self._to_pixels(float(sample[idx[0]]), float(sample[idx[1]]))
        if self.config.kind == "fixations":
            duration_ms = float(sample[idx[2]])
            if point is None:
                self.poster.skip("no frame yet")
                return
            self._post(stamp, duration_ms, point[0], point[1], stamp + duration_ms / 2000.0)
            return
        assert self.detector is not None
        if point is None:  # normalised gaze before the first frame: nothing to scale by
            return
        conf = float(sample[idx[2]]) if len(idx) > 2 else 1.0
        for fix in self.detector.push(stamp, point[0], point[1], conf):
            self._post(fix.onset, fix.duration_ms, fix.x, fix.y, fix.midpoint)

    def _flush(self) -> None:
        if self.detector is not None:
            for fix in self.detector.flush():
                self._post(fix.onset, fix.duration_ms, fix.x, fix.y, fix.midpoint)

    def _post(self, onset: float, duration_ms: float, x: float, y: float, t_frame: float) -> None:
        frame = self.frames.frame_at(t_frame)
        if frame is None:
            self.poster.skip("no frame yet")
            return
        try:
            patch = cut_patch(frame, x, y, **self._patch)
        except PatchError as exc:
            log.debug("fixation at (%.1f, %.1f) skipped: %s", x, y, exc)
            self.poster.skip("gaze off the frame")
            return
        self.poster.submit(t=onset, duration_ms=duration_ms, x=x, y=y, patch=patch)
