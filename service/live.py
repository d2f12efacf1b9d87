"""``LiveFeed``: the little the live page (``GET /ui``) needs that the metrics do not keep.

The Prometheus metrics hold aggregates only (no stream id is ever a label). The page also shows, per
stream, the recent errors against the repeat baseline and thumbnails of the last patches, so the
worker keeps two bounded rings per stream here, filled once per tick by :meth:`LiveFeed.observe`:

- ``series``: the last :data:`SERIES_LEN` applied fixations as (fixation number, step, error, repeat
  error), for the page's "error over fixations" chart;
- ``thumbs``: the last :data:`THUMBS_LEN` patches shrunk to :data:`THUMB_PX` pixels (raw RGB, 3 KB
  each), encoded to PNG only when the page asks (:meth:`LiveFeed.detail`), so a tick pays one
  ``cv2.resize`` per fixation and no encoding.

At most :data:`MAX_STREAMS` streams are kept (the least recently fed is dropped first), so the feed
holds at most about 256 x (16 x 3 KB + 240 x 32 B), some 14 MB, however many streams the worker
holds. The rings live in the worker's process: in Redis mode the API process has none, and the page
shows the streams without thumbnails or per-stream series.

Examples
--------
>>> import numpy as np
>>> feed = LiveFeed()
>>> feed.observe(["s1"], [np.zeros((64, 64, 3), np.uint8)], steps=[1], errors=[float("nan")],
...              repeat_errors=[float("nan")], seqs=[0])
>>> d = feed.detail("s1")
>>> d["fixations"], len(d["thumbs"]), d["thumbs"][0]["png"][:22]
(1, 1, 'data:image/png;base64,')
"""

from __future__ import annotations

import base64
import math
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

#: Applied fixations per stream in the error-over-fixations series.
SERIES_LEN = 240
#: Patch thumbnails kept per stream.
THUMBS_LEN = 16
#: Thumbnail side in pixels.
THUMB_PX = 32
#: Streams the feed keeps; the least recently fed is forgotten first.
MAX_STREAMS = 256


def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


@dataclass
class _Thumb:
    n: int  # the stream's fixation number (1 = its first)
    step: int
    seq: int | None
    error: float | None
    repeat_error: float | None
    pixels: np.ndarray  # (THUMB_PX, THUMB_PX, 3) uint8 RGB


@dataclass
class _StreamFeed:
    fixations: int = 0
    series: deque[tuple[int, int, float | None, float | None]] = field(
        default_factory=lambda: deque(maxlen=SERIES_LEN)
    )
    thumbs: deque[_Thumb] = field(default_factory=lambda: deque(maxlen=THUMBS_LEN))


def thumbnail(patch: np.ndarray) -> np.ndarray:
    """A (THUMB_PX, THUMB_PX, 3) uint8 copy of an (H, W, 3) uint8 patch (area-averaged)."""
    small = cv2.resize(patch, (THUMB_PX, THUMB_PX), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(small, dtype=np.uint8)


def png_data_url(pixels: np.ndarray) -> str:
    """An RGB uint8 image as a ``data:image/png;base64,...`` URL (OpenCV encodes BGR)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    if not ok:  # cv2 fails only on an empty or odd-typed array, which thumbnail() never makes
        raise ValueError("could not encode a thumbnail")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _thumb_json(t: _Thumb) -> dict[str, Any]:
    return {"n": t.n, "step": t.step, "seq": t.seq, "error": t.error, "repeat_error": t.repeat_error,
            "png": png_data_url(t.pixels)}  # fmt: skip


class LiveFeed:
    """Per-stream rings of recent errors and patch thumbnails (see the module docstring).

    Thread-safe: the worker writes between ticks, the API's live page reads from another thread.
    """

    def __init__(self, max_streams: int = MAX_STREAMS) -> None:
        self.max_streams = max_streams
        self._lock = threading.Lock()
        self._streams: OrderedDict[str, _StreamFeed] = OrderedDict()

    def observe(
        self,
        stream_ids: Sequence[str],
        patches: Sequence[np.ndarray],
        *,
        steps: Sequence[int],
        errors: Sequence[float],
        repeat_errors: Sequence[float],
        seqs: Sequence[int | None],
    ) -> None:
        """Record one tick's applied fixations (errors NaN where nothing was predicted)."""
        thumbs = [thumbnail(p) for p in patches]  # outside the lock: the page's reads never wait on it
        with self._lock:
            for i, sid in enumerate(stream_ids):
                feed = self._streams.get(sid)
                if feed is None:
                    feed = self._streams[sid] = _StreamFeed()
                    while len(self._streams) > self.max_streams:
                        self._streams.popitem(last=False)
                else:
                    self._streams.move_to_end(sid)
                feed.fixations += 1
                error, repeat = _number(errors[i]), _number(repeat_errors[i])
                feed.series.append((feed.fixations, int(steps[i]), error, repeat))
                feed.thumbs.append(_Thumb(feed.fixations, int(steps[i]), seqs[i], error, repeat, thumbs[i]))

    def forget(self, stream_id: str) -> None:
        """Drop a deleted stream's rings."""
        with self._lock:
            self._streams.pop(stream_id, None)

    def clear(self) -> None:
        with self._lock:
            self._streams.clear()

    def detail(self, stream_id: str) -> dict[str, Any] | None:
        """The stream's series and thumbnails (newest last), or ``None`` when the feed has none."""
        with self._lock:
            feed = self._streams.get(stream_id)
            if feed is None:
                return None
            series = list(feed.series)
            thumbs = list(feed.thumbs)
            fixations = feed.fixations
        return {
            "stream_id": stream_id,
            "fixations": fixations,
            "series": [{"n": n, "step": s, "error": e, "repeat_error": r} for n, s, e, r in series],
            "thumbs": [_thumb_json(t) for t in thumbs],
        }


#: The process's feed, filled by the worker (service/worker.py) and read by service/api/routes/ui.py.
FEED = LiveFeed()
