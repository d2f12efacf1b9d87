"""``foveate bridge lsl`` and ``foveate bridge pupil``: live eye trackers into a foveate server.

``register(bridge_subparsers)`` adds both to ``foveate bridge`` (``clients/cli.py`` calls it);
``python -m clients.bridges.cli lsl ...`` runs them without the ``foveate`` entry point.

A run ends at Ctrl-C, SIGTERM or ``--duration``; it then posts what is still waiting (for at most
``--drain-timeout`` seconds), logs a summary and writes ``--report``. Exit status: 0 when every
fixation found was delivered or rejected by the server, 3 when some were still waiting at the end,
1 on an error (the message says what to fix), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

EXIT_UNSENT = 3


def register(subparsers: Any) -> None:
    """Add ``lsl`` and ``pupil`` to the ``foveate bridge`` sub-parsers."""
    lsl = subparsers.add_parser(
        "lsl",
        help="read gaze or fixations from Lab Streaming Layer",
        description="Read a gaze stream (fixations detected here, I-VT or I-DT) or a fixation stream from "
        "Lab Streaming Layer, cut patches from --frames at each fixation and post them.",
    )
    src = lsl.add_argument_group("LSL stream")
    src.add_argument("--name", help="resolve the stream by name")
    src.add_argument("--type", help="resolve the stream by content type (e.g. Gaze)")
    src.add_argument(
        "--kind",
        choices=("gaze", "fixations"),
        default="gaze",
        help="raw gaze samples (default) or one sample per fixation (x, y, duration_ms)",
    )
    src.add_argument(
        "--channels",
        metavar="I,J[,K]",
        help="channel indices: gaze x,y[,confidence] (default 0,1); fixations x,y,duration_ms "
        "(default 0,1,2)",
    )
    src.add_argument(
        "--units",
        choices=("px", "norm"),
        default="px",
        help="coordinates in frame pixels (default) or fractions of the frame",
    )
    src.add_argument(
        "--origin",
        choices=("top-left", "bottom-left"),
        default="top-left",
        help="where y = 0 is, for --units norm (Pupil: bottom-left)",
    )
    src.add_argument(
        "--source-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="gaze silent this long = source lost, resolve again (default 5; 0: never)",
    )
    src.add_argument(
        "--frames",
        required=True,
        metavar="SRC",
        help="where patches are cut: an image file, a video file, or a camera index (0)",
    )
    det = lsl.add_argument_group("fixation detection (gaze streams; docs/bridges.md)")
    det.add_argument("--detector", choices=("ivt", "idt"), default="ivt", help="I-VT (default) or I-DT")
    det.add_argument(
        "--velocity-threshold", type=float, default=30.0, metavar="DEG_S", help="I-VT (default 30)"
    )
    det.add_argument(
        "--dispersion-threshold", type=float, default=1.0, metavar="DEG", help="I-DT (default 1.0)"
    )
    det.add_argument(
        "--min-duration-ms", type=float, metavar="MS", help="shortest fixation (I-VT 60, I-DT 100)"
    )
    det.add_argument(
        "--min-confidence", type=float, metavar="C", default=0.6, help="drop samples below (default 0.6)"
    )
    det.add_argument(
        "--max-gap-ms", type=float, default=100.0, help="a longer gap ends a fixation (default 100)"
    )
    det.add_argument(
        "--merge-gap-ms", type=float, default=75.0, help="merge fixations closer in time (0: off)"
    )
    det.add_argument(
        "--merge-angle-deg", type=float, metavar="DEG", default=0.5, help="... and in space (default 0.5)"
    )
    _common_options(lsl, "lsl")
    lsl.set_defaults(func=_run_lsl)

    pupil = subparsers.add_parser(
        "pupil",
        help="read fixations and world frames from Pupil Capture",
        description="Subscribe to Pupil Capture's network API (Pupil Remote, topics 'fixations' and "
        "'frame.world'; enable the Fixation Detector and Frame Publisher plugins) and post each fixation.",
    )
    pupil.add_argument("--host", default="127.0.0.1", help="Pupil Capture's address (default 127.0.0.1)")
    pupil.add_argument("--port", type=int, default=50020, help="Pupil Remote's port (default 50020)")
    pupil.add_argument(
        "--frames", metavar="SRC", help="cut from this image/video/camera, not Capture's world frames"
    )
    pupil.add_argument(
        "--silence-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="ask Capture for its data port again after this long without a message (default 5)",
    )
    pupil.add_argument(
        "--merge-timeout",
        type=float,
        default=0.5,
        metavar="S",
        help="post a fixation when its id got no update for this long (default 0.5)",
    )
    _common_options(pupil, "pupil")
    pupil.set_defaults(func=_run_pupil)


def _common_options(parser: argparse.ArgumentParser, default_stream: str) -> None:
    out = parser.add_argument_group("server and run")
    out.add_argument(
        "--server",
        default=os.environ.get("FOVEATE_URL", "http://127.0.0.1:8000"),
        help="foveate server URL (default $FOVEATE_URL or http://127.0.0.1:8000)",
    )
    out.add_argument(
        "--api-key",
        metavar="KEY",
        help="the server's API key with the ingest scope (default $FOVEATE_API_KEY; better there than "
        "on a command line others can see)",
    )
    out.add_argument(
        "--stream-id", default=default_stream, help=f"stream to post to (default {default_stream})"
    )
    out.add_argument("--patch-px", type=int, metavar="N", help="patch side in pixels (default 64)")
    out.add_argument(
        "--patch-deg", type=float, metavar="DEG", help="patch side in degrees (needs --px-per-deg)"
    )
    out.add_argument("--px-per-deg", type=float, metavar="P", help="frame pixels per degree of visual angle")
    out.add_argument("--frame-buffer", type=int, default=16, metavar="N", help="frames kept for pairing (16)")
    out.add_argument(
        "--first-seq", type=int, default=0, metavar="N", help="sequence number of the first fixation"
    )
    out.add_argument("--no-reset", action="store_true", help="do not reset the stream at the first fixation")
    out.add_argument(
        "--backlog",
        type=int,
        default=1000,
        metavar="N",
        help="fixations kept while the server is unreachable (default 1000; then the oldest go)",
    )
    out.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="one request's timeout (default 10)"
    )
    out.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="at the end, keep posting what waits for at most this long (default 10)",
    )
    out.add_argument("--duration", type=float, metavar="S", help="stop after this many seconds")
    out.add_argument("--report", type=Path, metavar="FILE", help="write the run's counters here as JSON")
    out.add_argument("--report-every", type=float, default=10.0, metavar="S", help="log a summary this often")


def _patch_options(args: argparse.Namespace) -> dict[str, Any]:
    from learner.errors import ConfigError

    if args.patch_deg is not None:
        if args.patch_px is not None:
            raise ConfigError("give --patch-px or --patch-deg, not both")
        if args.px_per_deg is None:
            raise ConfigError("--patch-deg needs --px-per-deg to convert degrees to pixels")
        return {"size_deg": args.patch_deg, "px_per_deg": args.px_per_deg}
    return {"size_px": 64 if args.patch_px is None else args.patch_px}


def _poster(args: argparse.Namespace, bridge: str) -> Any:
    from clients.bridges.common import FixationPoster, SdkSink

    return FixationPoster(
        SdkSink(args.server, timeout_s=args.timeout, api_key=args.api_key),
        args.stream_id,
        bridge=bridge,
        max_backlog=args.backlog,
        first_seq=args.first_seq,
        reset_first=not args.no_reset,
        report_every_s=args.report_every,
        report_path=args.report,
        server=args.server,
    )


def _run(bridge: Any, poster: Any, frames: Any, args: argparse.Namespace) -> int:
    """Run until Ctrl-C, SIGTERM or --duration; drain, report, and return the exit status."""
    # One INFO line per request would bury the bridge's own reports.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():

        def on_term(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_term)
    timer = threading.Timer(args.duration, stop.set) if args.duration else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        bridge.run(stop)
    except KeyboardInterrupt:
        log.info("interrupted: posting what is waiting (Ctrl-C again to quit at once)")
    finally:
        if timer is not None:
            timer.cancel()
        if frames is not None:
            frames.close()
        stats = poster.close(drain_timeout_s=args.drain_timeout)
    print(stats.summary(), file=sys.stderr)
    if stats.backlog:
        log.error(
            "%d fixations were not delivered (last delivered seq %s)", stats.backlog, stats.last_seq_sent
        )
        return EXIT_UNSENT
    return 0


def _run_lsl(args: argparse.Namespace) -> int:
    import pylsl

    from clients.bridges.frames import open_frames
    from clients.bridges.lsl import LslBridge, LslConfig
    from clients.gaze import make_detector
    from learner.errors import ConfigError

    channels = None
    if args.channels:
        try:
            channels = tuple(int(c) for c in args.channels.split(","))
        except ValueError:
            raise ConfigError(
                f"--channels takes comma-separated indices like 0,1,2, got {args.channels!r}"
            ) from None
    config = LslConfig(
        name=args.name,
        type=args.type,
        kind=args.kind,
        channels=channels,
        units=args.units,
        origin=args.origin,
        source_timeout_s=args.source_timeout,
    )
    detector = None
    if args.kind == "gaze":
        if args.px_per_deg is None:
            raise ConfigError(
                "detecting fixations in gaze needs --px-per-deg (pixels per degree of visual angle)"
            )
        options: dict[str, float] = {
            "min_confidence": args.min_confidence,
            "max_gap_ms": args.max_gap_ms,
            "merge_gap_ms": args.merge_gap_ms,
            "merge_angle_deg": args.merge_angle_deg,
        }
        if args.min_duration_ms is not None:
            options["min_duration_ms"] = args.min_duration_ms
        if args.detector == "ivt":
            options["velocity_threshold"] = args.velocity_threshold
        else:
            options["dispersion_threshold"] = args.dispersion_threshold
        detector = make_detector(args.detector, args.px_per_deg, **options)
    patch = _patch_options(args)
    frames = open_frames(args.frames, pylsl.local_clock, keep=args.frame_buffer)
    poster = _poster(args, "lsl")
    bridge = LslBridge(config, poster, frames, detector=detector, **patch)
    return _run(bridge, poster, frames, args)


def _run_pupil(args: argparse.Namespace) -> int:
    import time

    from clients.bridges.frames import open_frames
    from clients.bridges.pupil import PupilBridge, PupilConfig

    config = PupilConfig(
        host=args.host,
        port=args.port,
        silence_timeout_s=args.silence_timeout,
        merge_timeout_s=args.merge_timeout,
    )
    patch = _patch_options(args)
    frames = open_frames(args.frames, time.monotonic, keep=args.frame_buffer) if args.frames else None
    poster = _poster(args, "pupil")
    bridge = PupilBridge(config, poster, frames=frames, keep=args.frame_buffer, **patch)
    return _run(bridge, poster, frames, args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m clients.bridges.cli {lsl,pupil} ...``: the bridges without the ``foveate`` entry point."""
    parser = argparse.ArgumentParser(
        prog="foveate bridge", description="Post fixations from a live eye tracker."
    )
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    register(parser.add_subparsers(dest="bridge", metavar="SOURCE", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from learner.errors import FoveateError

    try:
        return int(args.func(args))
    except FoveateError as exc:
        print(f"foveate bridge {args.bridge}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
