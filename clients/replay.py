"""Replay recorded free-viewing sessions to a foveate server, as live eye trackers would send them.

One stream per subject (``subject-<id>``), the images in the dataset's fixed order, each scanpath
in order, ``reset`` at the first fixation of every image. Each patch is cut client-side with
OpenCV (:func:`learner.patches.cut_patch`) around the gaze point and POSTed with the SDK's
:class:`~clients.sdk.AsyncFoveateClient`. Streams run concurrently, one asyncio task each, so
that the worker can batch them into one tick; within a stream a fixation is sent only after the
previous one's result came back, which keeps every stream in order. Pace: as fast as possible
(default) or real time (``realtime``: each fixation is sent when it ends, by the recorded
durations).

Every result becomes a :class:`ReplayRecord`, in the order the results arrived; ``foveate replay
--out`` writes them as JSON lines (``docs/clients.md`` has the format). Records and their
:class:`ReplaySummary` live in ``clients/replay_summary.py`` (re-exported here).

Examples
--------
>>> from clients.recorded import RecordedDataset, bundled_dataset_path
>>> ds = RecordedDataset.open(bundled_dataset_path())
>>> opts = ReplayOptions(subjects=["1", "2"], images=1)
>>> summary = replay(ds, "http://127.0.0.1:8000", opts)        # doctest: +SKIP
>>> summary.fixations, summary.scored                           # doctest: +SKIP
(19, 17)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from clients.recorded import Fixation, RecordedDataset
from clients.replay_summary import ReplayRecord, ReplaySummary, skill, summarize, write_records
from clients.sdk import AsyncFoveateClient, RetryPolicy
from clients.sdk.errors import Forbidden, RequestRejected, Unauthorized
from clients.sdk.fixation import Encoding
from learner.errors import InputError, PatchError
from learner.patches import cut_patch, patch_size_px

__all__ = [
    "ReplayOptions",
    "ReplayRecord",
    "ReplaySummary",
    "replay",
    "replay_async",
    "skill",
    "summarize",
    "write_records",
]

logger = logging.getLogger(__name__)


@dataclass
class ReplayOptions:
    """What to replay and how.

    Parameters
    ----------
    subjects : sequence of str, optional
        Subject ids, one stream each; default all.
    images : int or sequence of str, optional
        The first N images of the fixed order, or these images; default all.
    size_px : int, optional
        Patch side in pixels. Default 50 unless ``size_deg`` is given.
    size_deg : float, optional
        Patch side in degrees of visual angle; needs ``px_per_deg`` here or in ``dataset.json``.
    px_per_deg : float, optional
        Overrides the dataset's pixels per degree.
    realtime : bool
        Send each fixation when it ends, by the recorded durations (divided by ``speed``).
    speed : float
        Time compression of real-time pacing (2.0 = twice as fast as recorded).
    concurrency : int, optional
        Most requests in flight at once; default one per stream.
    stream_prefix : str
        Put before every stream id (``"run3-"`` gives ``run3-subject-1``), to keep replays apart.
    encoding : {"raw", "png", "jpeg"}
        How patches travel; raw pixels (default) cost the server no decoding.
    """

    subjects: Sequence[str] | None = None
    images: int | Sequence[str] | None = None
    size_px: int | None = None
    size_deg: float | None = None
    px_per_deg: float | None = None
    realtime: bool = False
    speed: float = 1.0
    concurrency: int | None = None
    stream_prefix: str = ""
    encoding: Encoding = "raw"

    def patch_side(self, dataset: RecordedDataset) -> int:
        """The patch side in pixels these options give on this dataset (``InputError`` if undefined)."""
        if self.size_px is not None and self.size_deg is not None:
            raise InputError("give the patch size in pixels or in degrees, not both")
        if self.size_deg is not None:
            ppd = self.px_per_deg or dataset.px_per_deg
            if ppd is None:
                raise InputError(
                    f"a patch size in degrees needs pixels per degree: dataset {dataset.name} has no "
                    "px_per_deg in dataset.json; pass --px-per-deg (or give the size with --patch-px)"
                )
            return patch_size_px(size_deg=self.size_deg, px_per_deg=ppd)
        return patch_size_px(50 if self.size_px is None else self.size_px)


class _Progress:
    """A tqdm bar showing the running error and the repeat baseline's (means of the last 200 scored
    fixations), or nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        self._recent: list[float] = []
        self._recent_repeat: list[float] = []
        if enabled:
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar = tqdm(total=total, unit="fix", dynamic_ncols=True, smoothing=0.1)

    def update(self, record: ReplayRecord) -> None:
        if record.error is not None:
            self._recent.append(record.error)
            del self._recent[:-200]
            if record.repeat_error is not None:
                self._recent_repeat.append(record.repeat_error)
                del self._recent_repeat[:-200]
        if self._bar is not None:
            self._bar.update(1)
            if self._recent and self._bar.n % 10 == 0:
                shown = {"error": f"{np.mean(self._recent):.4f}"}
                if self._recent_repeat:
                    shown["repeat"] = f"{np.mean(self._recent_repeat):.4f}"
                self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Stream:
    """One subject's session: cuts its patches and posts them in order."""

    def __init__(
        self, dataset: RecordedDataset, subject: str, stream_id: str, opts: ReplayOptions, side: int
    ) -> None:
        self.dataset = dataset
        self.subject = subject
        self.stream_id = stream_id
        self.opts = opts
        self.side = side
        self.fixations = list(dataset.session(subject, opts.images))
        self.skipped = 0
        self._image_name = ""
        self._image: np.ndarray | None = None

    async def _frame(self, name: str) -> np.ndarray:
        # Kept per stream: the dataset's small shared cache would thrash with many streams on
        # different images. Decoding runs in a thread so the other streams keep sending.
        if name != self._image_name or self._image is None:
            self._image = await asyncio.to_thread(self.dataset.load_image, name)
            self._image_name = name
        return self._image

    async def run(
        self,
        client: AsyncFoveateClient,
        gate: asyncio.Semaphore,
        emit: Callable[[ReplayRecord], None],
        start: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        onset_ms = 0.0
        pending_reset = False
        seq = 0
        for fix, reset in self.fixations:
            if reset:
                pending_reset = True
            t = onset_ms / 1000.0
            onset_ms += fix.duration_ms
            patch = self._cut(fix, await self._frame(fix.image))
            if patch is None:
                continue
            if self.opts.realtime:
                # A live detector reports a fixation when it ends.
                await asyncio.sleep(max(0.0, start + onset_ms / 1000.0 / self.opts.speed - loop.time()))
            async with gate:
                try:
                    result = await client.post_fixation(
                        self.stream_id, patch, seq=seq, t=t, duration_ms=fix.duration_ms, reset=pending_reset,
                        encoding=self.opts.encoding,
                    )  # fmt: skip
                except (Unauthorized, Forbidden):
                    raise  # the key is wrong for every fixation: stop, with the server's message
                except RequestRejected as exc:
                    logger.warning(
                        "%s: fixation %s of %s rejected: %s", self.stream_id, fix.fix_index, fix.image, exc
                    )
                    self.skipped += 1
                    continue
            emit(
                ReplayRecord(
                    self.stream_id, self.subject, fix.image, fix.fix_index, seq, pending_reset, t,
                    result.step, result.error, result.running_error, result.updates_applied,
                    repeat_error=result.repeat_error, skipped=result.skipped,
                )
            )  # fmt: skip
            seq += 1
            pending_reset = False

    def _cut(self, fix: Fixation, frame: np.ndarray) -> np.ndarray | None:
        try:
            return cut_patch(frame, fix.x, fix.y, self.side)
        except PatchError as exc:
            # A fixation recorded off the image: skip it; its reset (if any) moves to the next one.
            logger.info("%s: skipping fixation %s of %s: %s", self.stream_id, fix.fix_index, fix.image, exc)
            self.skipped += 1
            return None


async def replay_async(
    dataset: RecordedDataset,
    client: AsyncFoveateClient,
    options: ReplayOptions | None = None,
    *,
    on_record: Callable[[ReplayRecord], None] | None = None,
    progress: bool = False,
) -> tuple[list[ReplayRecord], ReplaySummary]:
    """Replay the sessions through ``client``; returns every record (in arrival order) and a summary.

    ``on_record`` is called with each record as its result arrives (to write it at once).
    Rejected fixations (4xx) are logged and skipped; other errors stop the replay.
    """
    opts = options or ReplayOptions()
    side = opts.patch_side(dataset)
    subjects = [str(s) for s in (opts.subjects if opts.subjects is not None else dataset.subjects)]
    if len(set(subjects)) != len(subjects):
        raise InputError(f"subjects {subjects} repeat an id; each subject is one stream")
    if opts.speed <= 0:
        raise InputError(f"speed must be > 0, got {opts.speed}")
    streams = [_Stream(dataset, s, f"{opts.stream_prefix}subject-{s}", opts, side) for s in subjects]
    total = sum(len(s.fixations) for s in streams)
    if total == 0:
        raise InputError(f"nothing to replay: subjects {subjects} have no fixations on the chosen images")
    concurrency = opts.concurrency or len(streams)
    if concurrency < 1:
        raise InputError(f"concurrency must be >= 1, got {concurrency}")
    logger.info("replaying %d fixations of %d streams (%d px patches, %s pace, %d in flight)",
                total, len(streams), side, "real-time" if opts.realtime else "full", concurrency)  # fmt: skip
    records: list[ReplayRecord] = []
    bar = _Progress(total, progress)

    def emit(record: ReplayRecord) -> None:
        records.append(record)
        bar.update(record)
        if on_record is not None:
            on_record(record)

    gate = asyncio.Semaphore(concurrency)
    started = time.perf_counter()
    start = asyncio.get_running_loop().time()
    try:
        async with asyncio.TaskGroup() as group:
            for stream in streams:
                group.create_task(stream.run(client, gate, emit, start))
    except ExceptionGroup as group_error:
        # One stream's failure cancels the others; raise its error itself, which callers can catch.
        raise group_error.exceptions[0] from None
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    summary = summarize(records, seconds, skipped=sum(s.skipped for s in streams))
    summary.loss = await _server_loss(client)
    return records, summary


async def _server_loss(client: AsyncFoveateClient) -> str | None:
    """The server's loss (what its errors measure), or None when its key may not read the model."""
    try:
        loss = (await client.model()).config.get("loss")
    except (Unauthorized, Forbidden):
        return None
    return str(loss) if loss is not None else None


def replay(
    dataset: RecordedDataset,
    base_url: str,
    options: ReplayOptions | None = None,
    *,
    out: IO[str] | None = None,
    progress: bool = False,
    retry: RetryPolicy | None = None,
    timeout: float = 60.0,
    api_key: str | None = None,
) -> tuple[list[ReplayRecord], ReplaySummary]:
    """Replay to the server at ``base_url`` (blocking); ``out`` receives one JSON line per record.

    ``api_key``: the server's key (ingest and read scopes); default ``$FOVEATE_API_KEY``.

    Returns the records in arrival order and a :class:`ReplaySummary`.
    """

    def write(record: ReplayRecord) -> None:
        if out is not None:
            out.write(record.to_json() + "\n")

    async def run() -> tuple[list[ReplayRecord], ReplaySummary]:
        async with AsyncFoveateClient(base_url, timeout=timeout, retry=retry, api_key=api_key) as client:
            return await replay_async(dataset, client, options, on_record=write, progress=progress)

    return asyncio.run(run())
