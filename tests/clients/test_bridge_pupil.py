"""The Pupil bridge against a local stand-in for Pupil Capture's network API, and into a real server.

``FakeCapture`` speaks Capture's protocol on 127.0.0.1: Pupil Remote (REP) answers ``SUB_PORT``;
the data socket publishes ``[topic, msgpack payload, raw image]`` for ``frame.world`` and
``[topic, msgpack payload]`` for ``fixations``, and re-publishes a growing fixation under one ``id``
as Capture's online detector does. It is an XPUB socket, so a test can wait until the bridge's
subscriptions have arrived instead of sleeping.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.clients._bridge_support import RecordingSink, stream_info, wait_for
from tests.clients._servers import REPO_ROOT, free_port, start_server, subprocess_env
from tests.conftest import in_ci

try:
    import msgpack
    import zmq
except ImportError:  # pragma: no cover - depends on the machine
    if in_ci():
        raise
    pytest.skip("pyzmq and msgpack are not installed (pip install pyzmq msgpack)", allow_module_level=True)

from clients.bridges.common import FixationPoster
from clients.bridges.pupil import PupilBridge, PupilConfig, decode_world_frame
from learner.errors import ConfigError, PatchError
from learner.patches import cut_patch

WORLD = np.random.default_rng(7).integers(0, 256, (240, 320, 3), dtype=np.uint8)  # RGB


class FakeCapture:
    """Pupil Remote on ``remote_port`` and a publisher on a fresh port, both on 127.0.0.1."""

    def __init__(self, remote_port: int) -> None:
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub_port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.rep = self.ctx.socket(zmq.REP)
        self.rep.setsockopt(zmq.LINGER, 0)
        self.rep.bind(f"tcp://127.0.0.1:{remote_port}")
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._remote = threading.Thread(target=self._serve_remote, daemon=True)
        self._remote.start()
        self.subscribed: set[str] = set()

    def _serve_remote(self) -> None:
        while not self._stop.is_set():
            if self.rep.poll(50):
                request = self.rep.recv_string()
                self.requests.append(request)
                self.rep.send_string(str(self.pub_port) if request == "SUB_PORT" else "unknown request")

    def wait_subscribed(self, topics: set[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not topics <= self.subscribed:
            assert time.monotonic() < deadline, f"subscriptions {self.subscribed}, expected {topics}"
            if self.pub.poll(100):
                message = self.pub.recv()
                if message[:1] == b"\x01":
                    self.subscribed.add(message[1:].decode())

    def send_frame(self, timestamp: float, image: np.ndarray = WORLD, fmt: str = "bgr") -> None:
        raw = encode(image, fmt)
        meta = {
            "topic": "frame.world",
            "width": image.shape[1],
            "height": image.shape[0],
            "index": 0,
            "timestamp": timestamp,
            "format": fmt,
        }
        self.pub.send_multipart([b"frame.world", msgpack.packb(meta, use_bin_type=True), raw])

    def send_fixation(
        self, fid: int, timestamp: float, duration_ms: float, norm_pos: tuple[float, float]
    ) -> None:
        payload = {
            "topic": "fixations",
            "id": fid,
            "timestamp": timestamp,
            "duration": duration_ms,
            "norm_pos": list(norm_pos),
            "dispersion": 0.4,
            "confidence": 0.9,
            "method": "2d gaze",
            "base_data": [["gaze.2d.0.", timestamp]],
        }
        self.pub.send_multipart([b"fixations", msgpack.packb(payload, use_bin_type=True)])

    def send_scanpath(self, fixations: list[tuple[int, float, tuple[float, float]]]) -> None:
        """Each (id, onset, norm_pos) as Capture's online detector sends it: 3 overlapping 150 ms windows."""
        for fid, onset, pos in fixations:
            for k in range(3):  # the window slides forward while the fixation lasts
                self.send_fixation(fid, onset + 0.05 * k, 150.0, pos)

    def close(self) -> None:
        self._stop.set()
        self._remote.join(timeout=5)
        self.pub.close()
        self.rep.close()
        self.ctx.term()


def encode(image: np.ndarray, fmt: str) -> bytes:
    """The image bytes Capture's Frame Publisher sends in format ``fmt``."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    return cv2.imencode(".jpg", bgr)[1].tobytes() if fmt == "jpeg" else bgr.tobytes()


def expected_xy(pos: tuple[float, float], frame: np.ndarray = WORLD) -> tuple[float, float]:
    return pos[0] * frame.shape[1], (1 - pos[1]) * frame.shape[0]


SCANPATH = [(10, 1.0, (0.5, 0.5)), (11, 1.4, (0.2, 0.8)), (12, 1.8, (0.9, 0.1)), (13, 2.2, (0.3, 0.3))]


def run_bridge(bridge: PupilBridge) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    thread.start()
    return thread, stop


@pytest.mark.parametrize("fmt", ["bgr", "jpeg"])
def test_fixations_are_merged_paired_with_world_frames_and_flipped(fmt: str) -> None:
    port = free_port()
    capture = FakeCapture(port)
    sink = RecordingSink()
    poster = FixationPoster(sink, "pupil", report_every_s=0)
    bridge = PupilBridge(PupilConfig(port=port, merge_timeout_s=0.3), poster, size_px=24)
    thread, stop = run_bridge(bridge)
    dark = np.zeros_like(WORLD)
    try:
        capture.wait_subscribed({"fixations", "frame.world"})
        capture.send_frame(0.5, dark, fmt)  # not the frame of any fixation: too early
        for t in (1.05, 1.45, 1.85, 2.25):
            capture.send_frame(t, WORLD, fmt)
        capture.send_frame(4.0, dark, fmt)
        capture.send_scanpath(SCANPATH)
        wait_for(lambda: len(sink.seqs) == len(SCANPATH), 20, "four fixations")
    finally:
        stop.set()
        thread.join(timeout=10)
        capture.close()
    stats = poster.close(drain_timeout_s=5)
    assert sink.seqs == [0, 1, 2, 3] and stats.sent == 4 and stats.skipped == 0
    for fix, (_, onset, pos) in zip(sink.fixations, SCANPATH, strict=True):
        assert (fix.x, fix.y) == pytest.approx(expected_xy(pos))
        assert fix.t == pytest.approx(onset) and fix.duration_ms == pytest.approx(250.0)  # 3 windows merged
        # The frame of the fixation's midpoint, not the dark ones before and after.
        world = cv2.cvtColor(
            cv2.imdecode(np.frombuffer(encode(WORLD, "jpeg"), np.uint8), 1), cv2.COLOR_BGR2RGB
        )
        expected = cut_patch(WORLD if fmt == "bgr" else world, fix.x, fix.y, 24)
        assert np.array_equal(fix.patch, expected)


def test_restarted_capture_on_a_new_port_is_found_again() -> None:
    port = free_port()
    capture = FakeCapture(port)
    sink = RecordingSink()
    poster = FixationPoster(sink, "pupil", report_every_s=0)
    config = PupilConfig(port=port, silence_timeout_s=0.5, request_timeout_s=0.5, merge_timeout_s=0.2)
    bridge = PupilBridge(config, poster, size_px=24)
    thread, stop = run_bridge(bridge)
    try:
        capture.wait_subscribed({"fixations", "frame.world"})
        capture.send_frame(1.0)
        capture.send_scanpath(SCANPATH[:2])
        wait_for(lambda: len(sink.seqs) == 2, 20, "the first Capture's fixations")
        first_port = capture.pub_port
        capture.close()  # Capture quits; it comes back with another data port and ids from 0
        time.sleep(1.0)
        capture = FakeCapture(port)
        assert capture.pub_port != first_port
        capture.wait_subscribed({"fixations", "frame.world"})
        capture.send_frame(0.1)
        capture.send_scanpath([(0, 0.2, (0.4, 0.6)), (1, 0.6, (0.7, 0.3))])
        wait_for(lambda: len(sink.seqs) == 4, 20, "the second Capture's fixations")
    finally:
        stop.set()
        thread.join(timeout=10)
        capture.close()
    stats = poster.close(drain_timeout_s=5)
    assert sink.seqs == [0, 1, 2, 3] and stats.source_restarts == 1
    assert [f.reset for f in sink.fixations] == [True, False, False, False]
    assert (sink.fixations[2].x, sink.fixations[2].y) == pytest.approx(expected_xy((0.4, 0.6)))


def test_fixation_before_any_world_frame_is_skipped_and_counted() -> None:
    port = free_port()
    capture = FakeCapture(port)
    poster = FixationPoster(RecordingSink(), "pupil", report_every_s=0)
    bridge = PupilBridge(PupilConfig(port=port, merge_timeout_s=0.1), poster)
    thread, stop = run_bridge(bridge)
    try:
        capture.wait_subscribed({"fixations", "frame.world"})
        capture.send_fixation(1, 1.0, 200.0, (0.5, 0.5))
        wait_for(lambda: poster.stats.skipped == 1, 20, "a skipped fixation")
    finally:
        stop.set()
        thread.join(timeout=10)
        capture.close()
    assert poster.close().skip_reasons == {"no world frame": 1}


def test_world_frame_formats() -> None:
    bgr = cv2.cvtColor(WORLD, cv2.COLOR_RGB2BGR).tobytes()
    assert np.array_equal(decode_world_frame(("bgr", 320, 240, bgr)), WORLD)
    grey = decode_world_frame(("gray", 320, 240, WORLD[:, :, 0].tobytes()))
    assert grey.shape == (240, 320, 3) and np.array_equal(grey[:, :, 2], WORLD[:, :, 0])
    with pytest.raises(PatchError, match="needs 230400 bytes"):
        decode_world_frame(("bgr", 320, 240, bgr[:-1]))
    with pytest.raises(PatchError, match="BGR or JPEG"):
        decode_world_frame(("yuv", 320, 240, b"\x00" * 10))
    with pytest.raises(ConfigError, match="port"):
        PupilConfig(port=0)


@pytest.mark.slow
def test_end_to_end_through_the_cli_into_a_real_server(tmp_path: Path) -> None:
    server = start_server(tmp_path / "server")
    port = free_port()
    capture = FakeCapture(port)
    report = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "clients.bridges.cli",
        "pupil",
        "--port",
        str(port),
        "--server",
        server.url,
        "--stream-id",
        "pupil-e2e",
        "--patch-px",
        "40",
        "--merge-timeout",
        "0.3",
        "--report",
        str(report),
    ]
    log = open(tmp_path / "bridge.log", "ab")
    bridge = subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        capture.wait_subscribed({"fixations", "frame.world"}, timeout=90)
        for t in (1.0, 1.5, 2.0):
            capture.send_frame(t, fmt="jpeg")
        capture.send_scanpath(SCANPATH)
        wait_for(
            lambda: (stream_info(server.url, "pupil-e2e") or {}).get("fixations") == len(SCANPATH),
            60,
            "the fixations on the server",
        )
        info = stream_info(server.url, "pupil-e2e")
        assert info is not None and info["last_seq"] == len(SCANPATH) - 1 and info["step"] == len(SCANPATH)
        assert info["last_t"] == pytest.approx(SCANPATH[-1][1])
        bridge.send_signal(signal.SIGTERM)
        assert bridge.wait(timeout=30) == 0, (tmp_path / "bridge.log").read_text()
        final = json.loads(report.read_text())
        assert (final["detected"], final["sent"], final["backlog"], final["skipped"]) == (4, 4, 0, 0)
    finally:
        if bridge.poll() is None:
            bridge.kill()
            bridge.wait(timeout=10)
        log.close()
        capture.close()
        server.stop()
