"""FixationPoster: per-stream numbering, order, resume after an outage, bounded backlog, the report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from clients.bridges.common import (
    FixationPoster,
    OutgoingFixation,
    PosterClosed,
    SdkSink,
    SinkError,
    SinkRejected,
    SinkUnavailable,
)
from clients.bridges.frames import FrameRing, StillFrame, open_frames
from learner.errors import ConfigError, InputError, PatchError
from tests.clients._bridge_support import RecordingSink, wait_for

PATCH = np.zeros((8, 8, 3), np.uint8)


def submit_n(poster: FixationPoster, n: int, t0: float = 0.0) -> list[int]:
    return [poster.submit(t=t0 + i, duration_ms=200.0, x=1.0, y=2.0, patch=PATCH) for i in range(n)]


def test_numbers_in_order_and_resets_only_the_first() -> None:
    sink = RecordingSink()
    poster = FixationPoster(sink, "s1", first_seq=5, report_every_s=0)
    assert submit_n(poster, 4) == [5, 6, 7, 8]
    stats = poster.close(drain_timeout_s=5)
    assert sink.seqs == [5, 6, 7, 8]
    assert [f.reset for f in sink.fixations] == [True, False, False, False]
    assert {sid for sid, _ in sink.received} == {"s1"}
    assert (stats.detected, stats.sent, stats.backlog, stats.last_seq_sent, stats.last_step) == (
        4,
        4,
        0,
        8,
        4,
    )


def test_outage_keeps_the_backlog_and_resumes_at_the_first_unsent() -> None:
    sink = RecordingSink()
    poster = FixationPoster(sink, "s1", backoff_s=0.01, max_backoff_s=0.05, report_every_s=0)
    submit_n(poster, 3)
    wait_for(lambda: len(sink.seqs) == 3, 5, "the first three")
    sink.down.set()  # the server goes away
    submit_n(poster, 5, t0=10)
    wait_for(lambda: poster.stats.failed_attempts >= 3, 5, "failed attempts")
    assert poster.stats.backlog == 5 and sink.seqs == [0, 1, 2]
    sink.down.clear()  # and comes back
    wait_for(lambda: poster.stats.backlog == 0, 5, "the backlog to drain")
    stats = poster.close(drain_timeout_s=5)
    assert sink.seqs == list(range(8))  # in order, nothing skipped, nothing twice
    assert stats.sent == 8 and stats.outages == 1 and stats.dropped == 0
    assert "ConnectError" in (stats.last_failure or "")


def test_full_backlog_drops_the_oldest_waiting() -> None:
    sink = RecordingSink()
    sink.down.set()
    poster = FixationPoster(sink, "s1", max_backlog=3, backoff_s=0.01, max_backoff_s=0.02, report_every_s=0)
    submit_n(poster, 6)
    sink.down.clear()
    stats = poster.close(drain_timeout_s=5)
    # The head (seq 0) may be in flight when the backlog overflows, so it is kept; others go oldest first.
    assert stats.dropped == 3 and stats.sent == 3
    assert sink.seqs[-2:] == [4, 5] and sink.seqs[0] in (0, 3)


def test_rejected_fixations_are_counted_and_skipped() -> None:
    sink = RecordingSink(reject_seqs={1})
    poster = FixationPoster(sink, "s1", report_every_s=0)
    submit_n(poster, 3)
    stats = poster.close(drain_timeout_s=5)
    assert sink.seqs == [0, 2]
    assert (stats.sent, stats.rejected) == (2, 1) and "PatchError" in (stats.last_failure or "")


def test_limited_retries_give_up() -> None:
    calls: list[int] = []

    def flaky(stream_id: str, fix: object) -> object:
        calls.append(1)
        raise SinkUnavailable("ServerError: boom", retry_limit=2)

    poster = FixationPoster(flaky, "s1", backoff_s=0.01, report_every_s=0)  # type: ignore[arg-type]
    submit_n(poster, 1)
    stats = poster.close(drain_timeout_s=5)
    assert len(calls) == 3 and stats.rejected == 1 and stats.backlog == 0


def test_close_with_the_server_down_reports_what_is_left(tmp_path: Path) -> None:
    sink = RecordingSink()
    sink.down.set()
    report = tmp_path / "report.json"
    poster = FixationPoster(sink, "s1", backoff_s=0.01, report_every_s=0.05, report_path=report, bridge="lsl")
    submit_n(poster, 4)
    wait_for(lambda: report.exists() and json.loads(report.read_text())["failed_attempts"] > 0, 5, "a report")
    start = time.monotonic()
    stats = poster.close(drain_timeout_s=0.3)
    assert time.monotonic() - start < 3
    assert stats.backlog == 4 and stats.sent == 0
    final = json.loads(report.read_text())
    assert final["backlog"] == 4 and final["bridge"] == "lsl" and final["stream_id"] == "s1"
    with pytest.raises(PosterClosed, match="after close"):
        submit_n(poster, 1)
    with pytest.raises(ConfigError, match="max_backlog"):
        FixationPoster(sink, "s1", max_backlog=0)


def test_a_sink_bug_surfaces_in_the_bridge_thread() -> None:
    def broken(stream_id: str, fix: object) -> object:
        raise ZeroDivisionError("bug")

    poster = FixationPoster(broken, "s1", report_every_s=0)  # type: ignore[arg-type]
    submit_n(poster, 1)
    wait_for(lambda: not poster._thread.is_alive(), 5, "the sender to stop")
    with pytest.raises(SinkError, match="ZeroDivisionError"):
        submit_n(poster, 1)


def test_skips_and_source_restarts_are_counted() -> None:
    poster = FixationPoster(RecordingSink(), "s1", report_every_s=0)
    poster.skip("no frame yet")
    poster.skip("no frame yet")
    poster.source_restarted()
    stats = poster.close()
    assert stats.skipped == 2 and stats.skip_reasons == {"no frame yet": 2} and stats.source_restarts == 1


def test_frame_ring_picks_the_nearest_and_restarts_on_a_new_clock() -> None:
    ring = FrameRing(keep=3)
    assert ring.nearest(1.0) is None
    for t in (1.0, 2.0, 3.0, 4.0):
        ring.add(t, np.full((1, 1, 3), t, np.uint8))
    assert len(ring) == 3 and int(ring.nearest(0.0)[0, 0, 0]) == 2 and int(ring.nearest(3.4)[0, 0, 0]) == 3
    ring.add(0.5, np.zeros((1, 1, 3), np.uint8))  # time went back: a restarted source
    assert len(ring) == 1


def test_frame_sources(tmp_path: Path) -> None:
    import cv2

    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "still.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    still = open_frames(str(tmp_path / "still.png"), time.monotonic)
    assert isinstance(still, StillFrame) and np.array_equal(still.frame_at(12.0), image)
    video_path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video_path), cv2.VideoWriter_fourcc(*"MJPG"), 50.0, (60, 40))
    for k in range(10):
        writer.write(np.full((40, 60, 3), 20 * k, np.uint8))
    writer.release()
    video = open_frames(str(video_path), time.monotonic, keep=4)
    try:
        wait_for(lambda: video.frame_at(None) is not None, 10, "a video frame")
        assert video.frame_at(None).shape == (40, 60, 3)
    finally:
        video.close()
    with pytest.raises(InputError, match="not found"):
        open_frames(str(tmp_path / "missing.mp4"), time.monotonic)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read"):
        open_frames(str(tmp_path / "bad.png"), time.monotonic)


def test_stop_event_is_honoured_quickly_during_backoff() -> None:
    sink = RecordingSink()
    sink.down.set()
    poster = FixationPoster(sink, "s1", backoff_s=5.0, max_backoff_s=5.0, report_every_s=0)
    submit_n(poster, 1)
    wait_for(lambda: sink.attempts >= 1, 5, "a first attempt")
    start = time.monotonic()
    poster.close(drain_timeout_s=0.2)
    assert time.monotonic() - start < 2.0


def test_sdk_sink_sorts_answers_into_retry_and_skip() -> None:
    """The SDK adapter: 200 is a result, 429/503/504 and no connection are retried, 422 is skipped,
    500 is retried a few times."""
    answers: dict[int, tuple[int, dict]] = {
        0: (
            200,
            {
                "stream_id": "s",
                "seq": 0,
                "step": 1,
                "error": None,
                "running_error": None,
                "updates_applied": 0,
            },
        ),
        1: (503, {"error": "WorkerUnavailable", "detail": "no live worker"}),
        2: (429, {"error": "QueueFull", "detail": "queue full"}),
        3: (422, {"error": "PatchError", "detail": "cannot decode image"}),
        4: (500, {"error": "WorkerError", "detail": "bug"}),
        5: (504, {"error": "WorkerTimeout", "detail": "slow"}),
    }
    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if body["seq"] == 6:
            raise httpx.ConnectError("refused", request=request)
        status, answer = answers[body["seq"]]
        return httpx.Response(status, json=answer)

    sink = SdkSink("http://127.0.0.1:9", transport=httpx.MockTransport(handler))
    fix = OutgoingFixation(0, 1.5, 200.0, 3.0, 4.0, np.zeros((8, 8, 3), np.uint8), reset=True)
    assert sink("s", fix).step == 1
    assert {k: bodies[0][k] for k in ("seq", "t", "duration_ms", "reset")} == {
        "seq": 0,
        "t": 1.5,
        "duration_ms": 200.0,
        "reset": True,
    }
    assert bodies[0]["patch_b64"]
    for seq, kind, limit in (
        (1, SinkUnavailable, None),
        (2, SinkUnavailable, None),
        (3, SinkRejected, None),
        (4, SinkUnavailable, 3),
        (5, SinkUnavailable, None),
        (6, SinkUnavailable, None),
    ):
        with pytest.raises(kind) as info:
            sink("s", OutgoingFixation(seq, 0.0, 1.0, 0.0, 0.0, fix.patch))
        assert getattr(info.value, "retry_limit", None) == limit
    sink.close()


def test_a_patch_the_sdk_refuses_is_skipped_by_the_bridge_and_is_a_learner_patch_error() -> None:
    """A float patch never leaves the client: the SDK's encoder raises its PatchError, the bridge's
    sink handler counts it as rejected and goes on; the error is the learner's PatchError too, so the
    one ``except PatchError`` that catches ``cut_patch`` failures catches it as well."""
    posted: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seq = json.loads(request.content)["seq"]
        posted.append(seq)
        return httpx.Response(200, json={"stream_id": "s", "seq": seq, "step": len(posted), "error": None,
                                         "running_error": None, "updates_applied": 0})  # fmt: skip

    sink = SdkSink("http://127.0.0.1:9", transport=httpx.MockTransport(handler))
    with pytest.raises(SinkRejected, match="uint8") as refused:
        sink("s", OutgoingFixation(0, 0.0, 1.0, 0.0, 0.0, PATCH.astype(np.float32)))
    assert isinstance(refused.value.__cause__, PatchError) and posted == []
    poster = FixationPoster(sink, "s", report_every_s=0)
    poster.submit(t=0.0, duration_ms=200.0, x=1.0, y=2.0, patch=PATCH.astype(np.float32))
    submit_n(poster, 1, t0=1.0)
    stats = poster.close(drain_timeout_s=5)
    sink.close()
    assert (stats.sent, stats.rejected, posted) == (1, 1, [1])
    assert "PatchError" in (stats.last_failure or "") and "uint8" in (stats.last_failure or "")
