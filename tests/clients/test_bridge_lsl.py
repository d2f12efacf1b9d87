"""The LSL bridge against real LSL outlets on 127.0.0.1, and end to end into a real server.

liblsl reads ``LSLAPICFG`` once, at its first use in a process: this module sets it, before pylsl
is imported, to a configuration written here that keeps resolution and data on loopback under a
session id of its own (``write_lsl_config``); the bridge subprocesses inherit it.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.clients._bridge_support import (
    DT,
    PX_PER_DEG,
    RecordingSink,
    TrueFixation,
    kill_hard,
    serve_on,
    stream_info,
    synthetic_gaze,
    wait_for,
    write_lsl_config,
)
from tests.clients._servers import REPO_ROOT, free_port, subprocess_env
from tests.conftest import in_ci

_CFG_DIR = Path(tempfile.mkdtemp(prefix="foveate-lsl-"))
atexit.register(shutil.rmtree, _CFG_DIR, True)
os.environ["LSLAPICFG"] = str(write_lsl_config(_CFG_DIR))

try:
    import pylsl
except ImportError:  # pragma: no cover - depends on the machine
    if in_ci():
        raise
    pytest.skip("pylsl is not installed (pip install pylsl)", allow_module_level=True)

from clients.bridges.common import FixationPoster  # noqa: E402
from clients.bridges.frames import StillFrame  # noqa: E402
from clients.bridges.lsl import LslBridge, LslConfig  # noqa: E402
from clients.gaze import IVTDetector  # noqa: E402
from learner.errors import ConfigError  # noqa: E402
from learner.patches import cut_patch  # noqa: E402

SCREEN = np.random.default_rng(42).integers(0, 256, (750, 900, 3), dtype=np.uint8)  # 30 x 25 deg


def gaze_outlet(name: str, source_id: str = "") -> pylsl.StreamOutlet:
    info = pylsl.StreamInfo(name, "Gaze", 3, RATE, pylsl.cf_double64, source_id)
    return pylsl.StreamOutlet(info)


RATE = 1.0 / DT


def push_gaze(
    outlet: pylsl.StreamOutlet, samples: list[tuple[float, float, float, float]], *, end: bool = False
) -> None:
    """Push samples; ``end`` adds a lost sample 300 ms later, whose gap ends the last fixation."""
    for t, x, y, c in samples:
        outlet.push_sample([x, y, c], timestamp=t)
    if end:
        outlet.push_sample([np.nan, np.nan, 0.0], timestamp=samples[-1][0] + 0.3)


def check_fixations(got: list, truth: list[TrueFixation], t_tol: float = 3 * DT) -> None:
    assert len(got) == len(truth)
    for fix, true in zip(got, truth, strict=True):
        assert np.hypot(fix.x / PX_PER_DEG - true.x_deg, fix.y / PX_PER_DEG - true.y_deg) < 0.2
        assert abs(fix.t - true.onset) < t_tol
        assert np.array_equal(fix.patch, cut_patch(SCREEN, fix.x, fix.y, 32))


def run_in_thread(bridge: LslBridge) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    thread.start()
    return thread, stop


def test_gaze_stream_fixations_are_detected_numbered_and_cut() -> None:
    outlet = gaze_outlet("foveate-test-gaze")
    sink = RecordingSink()
    poster = FixationPoster(sink, "rig", report_every_s=0)
    bridge = LslBridge(
        LslConfig(name="foveate-test-gaze", channels=(0, 1, 2)),
        poster,
        StillFrame(SCREEN),
        detector=IVTDetector(PX_PER_DEG),
        size_px=32,
    )
    thread, stop = run_in_thread(bridge)
    try:
        assert outlet.wait_for_consumers(30.0), "the bridge did not connect to the outlet"
        samples, truth = synthetic_gaze(11, t0=pylsl.local_clock())
        push_gaze(outlet, samples)
        wait_for(lambda: len(sink.seqs) == len(truth) - 1, 30, "all fixations but the open last one")
    finally:
        stop.set()
        thread.join(timeout=10)
    stats = poster.close(drain_timeout_s=5)
    assert sink.seqs == list(range(len(truth)))  # the last one was flushed at stop
    assert [f.reset for f in sink.fixations] == [True] + [False] * (len(truth) - 1)
    check_fixations(sink.fixations, truth)
    assert stats.sent == len(truth) and stats.source_restarts == 0 and bridge.samples == len(samples)


def test_fixation_stream_in_normalised_bottom_left_coordinates() -> None:
    info = pylsl.StreamInfo("foveate-test-fix", "Fixations", 3, pylsl.IRREGULAR_RATE, pylsl.cf_double64, "")
    outlet = pylsl.StreamOutlet(info)
    sink = RecordingSink()
    poster = FixationPoster(sink, "rig", report_every_s=0)
    config = LslConfig(type="Fixations", kind="fixations", units="norm", origin="bottom-left")
    bridge = LslBridge(config, poster, StillFrame(SCREEN), size_px=32)
    thread, stop = run_in_thread(bridge)
    sent = [
        (0.5, 0.5, 210.0),
        (0.1, 0.9, 180.0),
        (0.8, 0.25, 330.0),
        (1.5, 0.5, 200.0),
    ]  # the last is off-frame
    try:
        assert outlet.wait_for_consumers(30.0)
        t0 = pylsl.local_clock()
        for k, (nx, ny, dur) in enumerate(sent):
            outlet.push_sample([nx, ny, dur], timestamp=t0 + k)
        wait_for(lambda: poster.stats.detected + poster.stats.skipped == len(sent), 30, "four fixations")
    finally:
        stop.set()
        thread.join(timeout=10)
    stats = poster.close(drain_timeout_s=5)
    assert stats.skip_reasons == {"gaze off the frame": 1}
    got = sink.fixations
    assert [(f.x, f.y) for f in got] == [pytest.approx(p) for p in [(450, 375), (90, 75), (720, 562.5)]]
    assert [f.duration_ms for f in got] == [210.0, 180.0, 330.0]
    assert [f.t - t0 for f in got] == pytest.approx([0.0, 1.0, 2.0], abs=1e-3)


def test_restarted_source_is_found_again_and_numbering_goes_on() -> None:
    name = "foveate-test-restart"
    sink = RecordingSink()
    poster = FixationPoster(sink, "rig", report_every_s=0)
    bridge = LslBridge(
        LslConfig(name=name, channels=(0, 1, 2)),
        poster,
        StillFrame(SCREEN),
        detector=IVTDetector(PX_PER_DEG),
        size_px=32,
    )
    thread, stop = run_in_thread(bridge)
    try:
        first = gaze_outlet(name, source_id="tracker-A")
        assert first.wait_for_consumers(30.0)
        samples_a, truth_a = synthetic_gaze(1, n_fix=4, blink_in=None, t0=pylsl.local_clock())
        push_gaze(first, samples_a)
        wait_for(lambda: len(sink.seqs) == len(truth_a) - 1, 30, "the first source's fixations")
        del first  # the tracker's program quits: the bridge flushes the open fixation, resolves again
        wait_for(lambda: len(sink.seqs) == len(truth_a), 30, "the flushed last fixation")
        second = gaze_outlet(name, source_id="tracker-B")
        assert second.wait_for_consumers(30.0), "the bridge did not find the restarted source"
        samples_b, truth_b = synthetic_gaze(2, n_fix=4, blink_in=None, t0=pylsl.local_clock() + 100)
        push_gaze(second, samples_b)
        wait_for(
            lambda: len(sink.seqs) == len(truth_a) + len(truth_b) - 1, 30, "the second source's fixations"
        )
    finally:
        stop.set()
        thread.join(timeout=10)
    stats = poster.close(drain_timeout_s=5)
    total = len(truth_a) + len(truth_b)
    assert sink.seqs == list(range(total)) and stats.sent == total
    assert stats.source_restarts == 1
    assert [f.reset for f in sink.fixations].count(True) == 1
    check_fixations(sink.fixations, truth_a + truth_b)


def test_bad_configuration_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="--name or --type"):
        LslConfig()
    with pytest.raises(ConfigError, match="x,y,duration_ms"):
        LslConfig(name="a", kind="fixations", channels=(0, 1))
    poster = FixationPoster(RecordingSink(), "rig", report_every_s=0)
    with pytest.raises(ConfigError, match="detector"):
        LslBridge(LslConfig(name="a"), poster, StillFrame(SCREEN))
    outlet = gaze_outlet("foveate-test-channels")
    bridge = LslBridge(
        LslConfig(name="foveate-test-channels", channels=(0, 5)),
        poster,
        StillFrame(SCREEN),
        detector=IVTDetector(PX_PER_DEG),
    )
    with pytest.raises(ConfigError, match="has 3 channels"):
        bridge.run(threading.Event())
    poster.close()
    del outlet


def start_bridge(tmp_path: Path, server_url: str, stream_id: str, name: str) -> tuple[subprocess.Popen, Path]:
    screen_png = tmp_path / "screen.png"
    cv2.imwrite(str(screen_png), cv2.cvtColor(SCREEN, cv2.COLOR_RGB2BGR))
    report = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "foveate",
        "bridge",
        "lsl",
        "--name",
        name,
        "--channels",
        "0,1,2",
        "--frames",
        str(screen_png),
        "--px-per-deg",
        str(PX_PER_DEG),
        "--patch-px",
        "48",
        "--server",
        server_url,
        "--stream-id",
        stream_id,
        "--report",
        str(report),
        "--report-every",
        "0.2",
        "--timeout",
        "5",
        "--source-timeout",
        "0",
    ]
    log = open(tmp_path / "bridge.log", "ab")
    env = subprocess_env(LSLAPICFG=os.environ["LSLAPICFG"])
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, report


def read_report(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@pytest.mark.slow
def test_end_to_end_into_a_real_server_that_is_killed_and_restarted(tmp_path: Path) -> None:
    """Outlet -> bridge (subprocess, the CLI) -> server; the server is SIGKILLed while fixations keep
    coming and restarted on its port: every fixation detected reaches a server, in order, once."""
    port = free_port()
    server = serve_on(port, tmp_path / "server1")
    name, stream = "foveate-test-e2e", "lsl-e2e"
    bridge, report = start_bridge(tmp_path, server.url, stream, name)
    outlet = gaze_outlet(name)
    try:
        assert outlet.wait_for_consumers(60.0), (tmp_path / "bridge.log").read_text()
        samples_a, truth_a = synthetic_gaze(3, n_fix=4, blink_in=None, t0=pylsl.local_clock())
        push_gaze(outlet, samples_a, end=True)
        wait_for(
            lambda: (stream_info(server.url, stream) or {}).get("fixations") == len(truth_a),
            60,
            "phase A on the first server",
        )
        info_a = stream_info(server.url, stream)
        assert (
            info_a is not None and info_a["step"] == len(truth_a) and info_a["last_seq"] == len(truth_a) - 1
        )
        assert [e["step"] for e in info_a["recent_errors"]] == list(range(2, len(truth_a) + 1))

        kill_hard(server)
        samples_b, truth_b = synthetic_gaze(4, n_fix=4, blink_in=None, t0=samples_a[-1][0] + 1.0)
        push_gaze(outlet, samples_b, end=True)
        wait_for(lambda: read_report(report).get("backlog", 0) == len(truth_b), 60, "a backlog")
        assert read_report(report)["failed_attempts"] > 0

        server = serve_on(port, tmp_path / "server2")
        wait_for(
            lambda: (stream_info(server.url, stream) or {}).get("fixations") == len(truth_b),
            60,
            "phase B on the restarted server",
        )
        info_b = stream_info(server.url, stream)
        total = len(truth_a) + len(truth_b)
        # A fresh server saw exactly phase B, ending at the last seq: it resumed at seq len(truth_a).
        assert info_b is not None and info_b["last_seq"] == total - 1
        bridge.send_signal(signal.SIGTERM)
        assert bridge.wait(timeout=30) == 0, (tmp_path / "bridge.log").read_text()
        final = read_report(report)
        assert (final["detected"], final["sent"], final["backlog"]) == (total, total, 0)
        assert (final["dropped"], final["rejected"], final["last_seq_sent"]) == (0, 0, total - 1)
        assert final["outages"] == 1 and final["source_restarts"] == 0
    finally:
        if bridge.poll() is None:
            bridge.kill()
            bridge.wait(timeout=10)
        server.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "g", "--frames", "F"], "needs --px-per-deg"),
        (
            ["--name", "g", "--frames", "F", "--px-per-deg", "30", "--patch-deg", "2", "--patch-px", "9"],
            "not both",
        ),
        (["--name", "g", "--frames", "F", "--px-per-deg", "30", "--channels", "a,b"], "comma-separated"),
        (["--frames", "F", "--px-per-deg", "30"], "--name or --type"),
        (["--name", "g", "--frames", "missing.mp4", "--px-per-deg", "30"], "not found"),
    ],
)
def test_cli_usage_errors_say_what_to_fix(
    args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    from clients.bridges.cli import main

    assert main(["lsl", *args]) == 1
    assert message in capsys.readouterr().err
