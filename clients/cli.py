"""``foveate replay | demo | bridge``: the client commands (registered by ``foveate/cli.py``).

- ``replay DATASET_DIR``: stream recorded sessions to a server (``--server URL``) or to one started
  in-process (``--embedded``), writing one JSON line per fixation (``--out``) and figures (``--plot``).
- ``demo``: ``replay --embedded`` of the default dataset (the bundled ``data/osie-mini`` on a fresh
  clone): every subject, the first 20 images, figures and JSON lines in ``runs/demo/``, and a summary.
- ``bridge``: live eye trackers (LSL, Pupil Core); its subcommands come from ``clients/bridges/cli.py``.

Heavy imports (the service, torch, matplotlib, tqdm) happen inside the handlers, so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["register"]

logger = logging.getLogger(__name__)

DEMO_IMAGES = 20
DEMO_DIR = Path("runs/demo")


def register(subparsers: Any) -> None:
    """Add ``replay``, ``demo`` and (when ``clients.bridges.cli`` exists) ``bridge``."""
    replay = subparsers.add_parser(
        "replay",
        help="stream recorded eye-tracking sessions to a server",
        description="Stream recorded free-viewing sessions (docs/dataset-format.md) to a foveate server: one "
        "stream per subject, images in a fixed order, a reset at each new image, patches cut around each "
        "fixation with OpenCV. Writes one JSON line per fixation (--out) and figures (--plot).",
    )
    replay.add_argument(
        "dataset", type=Path, metavar="DATASET_DIR", help="folder with stimuli/ and fixations.csv"
    )
    where = replay.add_mutually_exclusive_group()
    where.add_argument(
        "--server", metavar="URL", help="the server (default $FOVEATE_URL or http://127.0.0.1:8000)"
    )
    where.add_argument(
        "--embedded",
        action="store_true",
        help="start a server in this process (model set by FOVEATE_* variables)",
    )
    _session_options(replay, images_default=None)
    replay.add_argument("--realtime", action="store_true", help="pace by the recorded fixation durations")
    replay.add_argument(
        "--speed", type=float, default=1.0, help="with --realtime: time compression (default 1)"
    )
    replay.add_argument("--out", type=Path, metavar="FILE", help="write one JSON line per fixation here")
    replay.add_argument("--plot", type=Path, metavar="DIR", help="save PNG figures of the error here")
    replay.add_argument(
        "--concurrency", type=int, metavar="K", help="requests in flight (default: one per stream)"
    )
    replay.add_argument(
        "--stream-prefix", default="", metavar="P", help="prefix of the stream ids (P + subject-ID)"
    )
    replay.add_argument(
        "--api-key",
        metavar="KEY",
        help="the server's API key, scopes ingest and read (default $FOVEATE_API_KEY; --embedded needs none)",
    )
    replay.add_argument(
        "--encoding",
        choices=("raw", "png", "jpeg"),
        default="raw",
        help="how patches travel (default raw pixels)",
    )
    replay.add_argument("--no-progress", action="store_true", help="no progress bar")
    replay.set_defaults(func=_replay)

    demo = subparsers.add_parser(
        "demo",
        help="replay the bundled OSIE sessions against an in-process server, with figures",
        description=f"Start a foveate server in this process, replay every subject's first {DEMO_IMAGES} "
        "images of the default dataset ($FOVEATE_DATASET, ../shared/data/osie, or the bundled "
        "data/osie-mini) "
        f"as fast as it learns, then write the figures and JSON lines to {DEMO_DIR}/ and print how the "
        "prediction error moved. Takes a few minutes on a 2-core CPU with the default model.",
    )
    demo.add_argument(
        "dataset", type=Path, nargs="?", metavar="DATASET_DIR", help="default: the default dataset"
    )
    _session_options(demo, images_default=DEMO_IMAGES)
    demo.add_argument("--out-dir", type=Path, default=DEMO_DIR, help=f"where results go (default {DEMO_DIR})")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)

    bridges = _bridges_cli()
    if bridges is not None:
        bridge = subparsers.add_parser(
            "bridge", help="post fixations from a live eye tracker (LSL, Pupil Core)"
        )
        bridges.register(bridge.add_subparsers(dest="bridge", metavar="SOURCE", required=True))


def _bridges_cli() -> Any:
    """``clients.bridges.cli`` if it exists (it is optional), else None; a broken one raises."""
    try:
        return importlib.import_module("clients.bridges.cli")
    except ModuleNotFoundError as exc:
        if exc.name in ("clients.bridges", "clients.bridges.cli"):
            return None
        raise


def _session_options(parser: argparse.ArgumentParser, images_default: int | None) -> None:
    parser.add_argument("--subjects", metavar="IDS", help="comma-separated subject ids (default: all)")
    parser.add_argument(
        "--images",
        type=int,
        default=images_default,
        metavar="N",
        help="the first N images of the fixed order (default: %s)"
        % ("all" if images_default is None else images_default),
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--patch-px", type=int, metavar="PX", help="patch side in pixels (default 50)")
    size.add_argument("--patch-deg", type=float, metavar="DEG", help="patch side in degrees of visual angle")
    parser.add_argument(
        "--px-per-deg",
        type=float,
        metavar="PPD",
        help="pixels per degree (default: the dataset's dataset.json)",
    )


def _options(args: argparse.Namespace, **extra: Any) -> Any:
    from clients.replay import ReplayOptions

    subjects = None
    if args.subjects:
        subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    return ReplayOptions(
        subjects=subjects,
        images=args.images,
        size_px=args.patch_px,
        size_deg=args.patch_deg,
        px_per_deg=args.px_per_deg,
        **extra,
    )


@contextlib.contextmanager
def _server(url: str | None, embedded: bool) -> Iterator[str]:
    """The base URL to replay to; starts (and finally stops) an embedded server when asked."""
    if not embedded:
        from clients.sdk._core import default_base_url

        yield url or default_base_url()
        return
    from clients.embedded import EmbeddedServer

    print("starting an embedded server (building the model) ...", file=sys.stderr)
    with EmbeddedServer() as server:
        print(f"live page: {server.url}/ (open it in a browser while the replay runs; API docs at "
              f"{server.url}/docs)", file=sys.stderr, flush=True)  # fmt: skip
        yield server.url


def _run(
    args: argparse.Namespace, url: str | None, embedded: bool, opts: Any, out: Path | None, plot: Path | None
) -> Any:
    """Open the dataset, replay, write the JSON lines and the figures; returns (records, summary, figures)."""
    from clients.recorded import RecordedDataset
    from clients.replay import replay

    if args.log_level != "DEBUG":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    dataset = RecordedDataset.open(args.dataset, px_per_deg=args.px_per_deg)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(out, "w", encoding="utf-8")) if out is not None else None
        base_url = stack.enter_context(_server(url, embedded))
        progress = not args.no_progress and sys.stderr.isatty()
        if progress:
            from tqdm.contrib.logging import logging_redirect_tqdm  # type: ignore[import-untyped]

            stack.enter_context(logging_redirect_tqdm())
        api_key = None if embedded else getattr(args, "api_key", None)
        records, summary = replay(dataset, base_url, opts, out=sink, progress=progress, api_key=api_key)
    figures: list[Path] = []
    if plot is not None:
        from clients.plots import plot_replay

        if summary.scored:
            figures = plot_replay(records, plot, title=dataset.name, loss=summary.loss)
        else:
            logger.warning("no fixation was scored, so there is nothing to plot")
    return dataset, summary, figures


def _report(summary: Any, figures: list[Path], out: Path | None) -> None:
    from clients.replay_summary import error_meaning

    print(
        f"replayed {summary.fixations} fixations of {summary.streams} streams in {summary.seconds:.1f} s "
        f"({summary.rate:.1f} fixations/s); {summary.updates_applied} updates applied"
    )
    if summary.skipped:
        print(f"skipped {summary.skipped} fixations (off the image, or rejected by the server)")
    if summary.scored:
        change = (
            (summary.error_last - summary.error_first) / summary.error_first * 100
            if summary.error_first
            else 0
        )
        print(f"scored {summary.scored} (the first fixation on each image has no prediction to score)")
        print(f"error: {error_meaning(summary.loss)}")
        if summary.ill_conditioned:
            print(f"{summary.ill_conditioned} scored fixations were too ill-conditioned to learn from")
        print(
            f"mean prediction error: {summary.mean_error:.4f}; first 20% {summary.error_first:.4f}, "
            f"last 20% {summary.error_last:.4f} ({change:+.1f}%)"
        )
        if summary.mean_repeat_error is not None:
            print(
                "repeat baseline (next embedding = current one): mean error "
                f"{summary.mean_repeat_error:.4f}; skill 1 - model/repeat = {_signed(summary.skill)} "
                "(above 0: the model beats repeating)"
            )
        steps = list(summary.error_by_step.items())  # every step, as the by-step figure shows them
        if summary.repeat_error_by_step:
            print("error by step within a scanpath, against the repeat baseline:")
            print(f"  {'step':>4}  {'error':>7}  {'repeat':>7}  {'skill':>7}  {'n':>6}")
            for s, e in steps:
                rep = summary.repeat_error_by_step.get(s)
                shown = "n/a" if rep is None else f"{rep:.4f}"
                skill = _signed(summary.skill_by_step.get(s))
                print(f"  {s:>4}  {e:7.4f}  {shown:>7}  {skill:>7}  {summary.count_by_step[s]:>6}")
        else:
            print("error by step within a scanpath (step: mean error, n):")
            print("  " + "  ".join(f"{s}: {e:.4f} ({summary.count_by_step[s]})" for s, e in steps))
    for path in figures:
        print(f"figure: {path}")
    if out is not None:
        print(f"JSON lines: {out}")


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _replay(args: argparse.Namespace) -> int:
    from learner.errors import FoveateError  # the SDK's errors and the dataset's alike

    opts = _options(
        args,
        realtime=args.realtime,
        speed=args.speed,
        concurrency=args.concurrency,
        stream_prefix=args.stream_prefix,
        encoding=args.encoding,
    )
    try:
        _, summary, figures = _run(args, args.server, args.embedded, opts, args.out, args.plot)
    except FoveateError as exc:
        print(f"foveate replay: error: {exc}", file=sys.stderr)
        return 1
    _report(summary, figures, args.out)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from clients.recorded import default_dataset_path
    from learner.errors import FoveateError  # the SDK's errors and the dataset's alike

    if args.dataset is None:
        args.dataset = default_dataset_path()
    opts = _options(args)
    out = args.out_dir / "fixations.jsonl"
    who = "all subjects" if opts.subjects is None else f"subjects {args.subjects}"
    print(f"foveate demo: replaying {args.dataset}, first {args.images} images, {who}", file=sys.stderr)
    try:
        dataset, summary, figures = _run(args, None, True, opts, out, args.out_dir)
    except FoveateError as exc:
        print(f"foveate demo: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"dataset {dataset.name}: {len(dataset.subjects) if opts.subjects is None else len(opts.subjects)} "
        f"subjects, first {args.images} images"
    )
    _report(summary, figures, out)
    return 0
