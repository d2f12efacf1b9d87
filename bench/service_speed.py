"""Service speed: end-to-end fixations per second and per-fixation latency, against the bare learner.

One process runs everything. For each stream count in ``--streams`` it measures these modes, in
``--rounds`` interleaved rounds so that a machine shared with other jobs loads them all alike:

* ``bare``: ``RFPLearner.tick`` on B = streams patches, in this process (no service); the reference.
* ``http``: a real ``foveate serve`` (embedded mode: API and worker in one process, uvicorn on
  127.0.0.1); every stream posts its next fixation (``raw_b64`` JSON) when its previous result came
  back, like a rig: ``POST /v1/streams/{id}/fixations``.
* ``http-batch``: the same server; ``--batch-streams`` streams share one ``POST /v1/fixations/batch``
  request per round (a gateway in front of several rigs).
* ``redis``: a real ``redis-server`` and ``foveate worker``; every stream ``XADD``s its fixations
  (``raw`` + ``shape``, docs/redis-format.md) with at most ``--window`` in flight (1: like a rig),
  through one pipelining connection, and its results are read back from ``foveate:results`` by
  entry id (no ``request_id``, so the worker pushes no per-request reply lists).

Patches are real: ``input_size`` squares cut from the OSIE images at recorded gaze points, encoded
before timing. Each run warms up (``--warmup`` s, 1 s in later rounds), then counts the fixations
answered within its share of ``--seconds``; the latency of a fixation runs from sending it to its
answer (bare: the tick). ``/metrics`` is read at the window's edges: the mean batch per worker tick
and the tick time explain the throughput. CPU seconds of every process, of each server's main thread
(``serve``: the API's event loop; ``worker``: the tick loop) and of the whole machine are read from
``/proc``, so the JSON says where the CPU went and how much other jobs took (``background_cores``).

``--threads`` (default 1) pins torch's threads in the servers and in the bare learner alike: on a
machine whose cores are shared with the API (or other jobs), more torch threads than free cores make
every tick wait on its slowest thread. ``--server-threads`` overrides the servers' count alone.

    python -m bench.service_speed --streams 1 16 128 --json runs/bench/service_speed.json
    python -m bench.service_speed --streams 16 64 128 --modes http http-batch redis --seconds 20
    python -m bench.service_speed --streams 64 --modes http --set max_wait_ms=20 max_batch=128
    python -m bench.service_speed --streams 64 --modes --threads 2      # the bare learner alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench._load import Load, Payloads, Window, http_load, redis_load
from bench._servers import (
    FoveateProcess,
    RedisServer,
    cpu_seconds,
    machine_busy_seconds,
    start_serve,
    start_worker,
)

MODES = ("http", "http-batch", "redis")


# ---------------------------------------------------------------- inputs


def load_patches(size: int, count: int) -> tuple[list[np.ndarray], str]:
    """``count`` real patches (size, size, 3) uint8 cut at recorded gaze points, and the dataset path."""
    from clients.recorded import RecordedDataset, default_dataset_path
    from learner.patches import cut_patch

    path = default_dataset_path()
    ds = RecordedDataset.open(path)
    out: list[np.ndarray] = []
    for tick in ds.interleaved():
        for _sid, fix, _reset in tick:
            out.append(cut_patch(ds.load_image(fix.image), fix.x, fix.y, size))
            if len(out) == count:
                return out, str(path)
    return out, str(path)


# ---------------------------------------------------------------- measurement window


def snapshot(pids: dict[str, int], metrics_url: str | None) -> dict[str, Any]:
    """CPU seconds of our processes and the machine, and the worker's batch and tick counters."""
    snap: dict[str, Any] = {
        "cpu": {name: cpu_seconds(pid) for name, pid in pids.items()},
        # a server's main thread: the event loop of `foveate serve`, the tick loop of `foveate worker`
        "main_thread": {name: cpu_seconds(pid, pid) for name, pid in pids.items() if name != "bench"},
        "machine": {},
    }
    busy = machine_busy_seconds()
    if busy is not None:
        snap["machine"]["busy"] = busy[0]
    if metrics_url:
        text = httpx.get(metrics_url, timeout=10.0).text
        wanted = (
            "foveate_batch_size_sum",
            "foveate_batch_size_count",
            "foveate_update_seconds_sum",
            "foveate_update_seconds_count",
        )
        snap["metrics"] = {
            s.name: s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name in wanted
        }
    return snap


Part = tuple[Window, dict[str, Any], dict[str, Any]]  # a measured window and the snapshots at its edges


def _deltas(parts: list[Part], section: str) -> dict[str, float]:
    """How much each counter of ``snapshot[section]`` grew, summed over the parts (unread ones left out)."""
    out: dict[str, float] = {}
    for key in parts[0][1].get(section, {}):
        pairs = [(before[section].get(key), after[section].get(key)) for _, before, after in parts]
        if all(b is not None and a is not None for b, a in pairs):
            out[key] = sum(a - b for b, a in pairs)
    return out


def summarise(parts: list[Part], streams: int) -> dict[str, Any]:
    """Throughput, latency percentiles, server batch and tick time, CPU per fixation, background load.

    ``parts`` are the rounds of one (mode, streams): their windows and counters add up.
    """
    seconds = sum(w.end - w.start for w, _, _ in parts)
    lat = np.concatenate([np.asarray(w.latencies) for w, _, _ in parts]) * 1e3
    n = len(lat)
    row: dict[str, Any] = {
        "streams": streams,
        "fixations": n,
        "seconds": seconds,
        "rounds": len(parts),
        "fixations_per_s": n / seconds,
        "latency_ms": {
            "p50": float(np.percentile(lat, 50)) if n else float("nan"),
            "p99": float(np.percentile(lat, 99)) if n else float("nan"),
            "mean": float(lat.mean()) if n else float("nan"),
        },
    }
    cpu = _deltas(parts, "cpu")
    row["cpu_ms_per_fixation"] = {k: 1e3 * v / max(n, 1) for k, v in cpu.items()}
    main = _deltas(parts, "main_thread")
    row["main_thread_cpu_ms_per_fixation"] = {k: 1e3 * v / max(n, 1) for k, v in main.items()}
    busy = _deltas(parts, "machine").get("busy")
    if busy is not None:
        row["background_cores"] = max(0.0, busy - sum(cpu.values())) / seconds
    metric = _deltas(parts, "metrics")
    if metric:
        row["ticks"] = ticks = metric["foveate_batch_size_count"]
        row["mean_batch"] = metric["foveate_batch_size_sum"] / max(ticks, 1)
        row["mean_tick_ms"] = (
            1e3 * metric["foveate_update_seconds_sum"] / max(metric["foveate_update_seconds_count"], 1)
        )
    return row


async def measure(
    load: Load,
    pids: dict[str, int],
    metrics_url: str | None,
    warmup: float,
    seconds: float,
) -> Part:
    """Run ``load`` through warm-up and the window; snapshot counters at the window's edges.

    Both snapshots are always taken: the load may finish before this coroutine wakes at the window's
    end (its last answer came as the window closed, and a loaded machine woke this late), which
    changes nothing in the counters. A load that failed raises its error at the first edge after.
    """
    now = time.perf_counter()
    window = Window(now + warmup, now + warmup + seconds)
    task = asyncio.create_task(load(window))
    snaps: list[dict[str, Any]] = []
    for edge in (window.start, window.end):
        await asyncio.sleep(max(0.0, edge - time.perf_counter()))
        if task.done():
            await task  # raises what the load raised
        snaps.append(await asyncio.to_thread(snapshot, pids, metrics_url))
    await task
    return window, snaps[0], snaps[1]


# ---------------------------------------------------------------- bare learner


def bare_run(learner: Any, payloads: Payloads, streams: int, tag: str, warmup: float, seconds: float) -> Part:
    """``learner.tick`` on all streams at once, in this process: every fixation waits one tick."""
    ids = [f"{tag}-{i}" for i in range(streams)]
    now = time.perf_counter()
    window = Window(now + warmup, now + warmup + seconds)
    pids = {"bench": os.getpid()}
    snaps: list[dict[str, Any]] = []
    step = 0
    while window.open():
        if not snaps and time.perf_counter() >= window.start:
            snaps.append(snapshot(pids, None))
        batch = np.stack([payloads.patches[payloads.index(i, step)] for i in range(streams)])  # (B, P, P, 3)
        sent = time.perf_counter()
        learner.tick(ids, batch)
        window.record(sent, time.perf_counter(), streams)
        step += 1
    if not snaps:
        snaps.append(snapshot(pids, None))
    return window, snaps[0], snapshot(pids, None)


# ---------------------------------------------------------------- orchestration


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """Environment of the foveate servers: threads, no checkpoints, quiet logs, the ``--set`` settings."""
    threads = str(args.server_threads or args.threads)
    env = {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "FOVEATE_TORCH_THREADS": threads,  # else the worker's own default (cores - 1) would override
        "FOVEATE_CHECKPOINT_PATH": "",
        "FOVEATE_LOG_LEVEL": "WARNING",
        "FOVEATE_SYNC_TIMEOUT_S": "120",
    }
    env.update({f"FOVEATE_{k.upper()}": v for k, v in args.set.items()})
    return env


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg": os.getloadavg(),
    }


class Bench:
    """The servers, the bare learner and the encoded patches of one benchmark run."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        import torch

        from learner.rfp import RFPLearner
        from learner.streaming import resolve_device
        from service.config import Settings

        torch.set_num_threads(args.threads)
        self.args = args
        self.settings = Settings(**args.set)
        self.cfg = self.settings.model_config_obj()
        patches, self.dataset = load_patches(self.cfg.input_size, args.patches)
        self.payloads = Payloads(patches)
        self.learner = RFPLearner(self.cfg, device=resolve_device(self.settings.device))
        self.env = server_env(args)
        self.workdir = workdir
        self.procs: dict[str, FoveateProcess | RedisServer] = {}

    def start(self) -> None:
        if {"http", "http-batch"} & set(self.args.modes):
            self.procs["serve"] = start_serve(self.workdir, self.env)
        if "redis" in self.args.modes:
            redis_srv = self.procs["redis"] = RedisServer.start_in(self.workdir)
            env = {**self.env, "FOVEATE_REDIS_URL": redis_srv.url}
            self.procs["worker"] = start_worker(redis_srv.url, self.workdir, env)

    def stop(self) -> None:
        for proc in reversed(self.procs.values()):
            proc.stop()

    def run(self, mode: str, streams: int, warmup: float) -> Part:
        """One round of one mode; the stream ids are the same in every round, so streams stay warm."""
        a, tag = self.args, f"{mode}{streams}"
        if mode == "bare":
            return bare_run(self.learner, self.payloads, streams, tag, warmup, a.seconds / a.rounds)
        if mode == "redis":
            redis_url = self.procs["redis"].url
            load = redis_load(
                redis_url,
                self.payloads,
                streams,
                tag,
                window_size=a.window,
                input_stream=self.settings.input_stream,
                results_stream=self.settings.results_stream,
            )
            pids = {
                "bench": os.getpid(),
                "worker": self.procs["worker"].pid,
                "redis": self.procs["redis"].pid,
            }
            metrics_url = self.procs["worker"].metrics_url  # type: ignore[union-attr]
        else:
            batch = min(a.batch_streams, streams) if mode == "http-batch" else None
            serve = self.procs["serve"]
            assert isinstance(serve, FoveateProcess)
            load = http_load(serve.url, self.payloads, streams, tag, client=a.client, batch_streams=batch)
            pids, metrics_url = {"bench": os.getpid(), "serve": serve.pid}, serve.metrics_url
        return asyncio.run(measure(load, pids, metrics_url, warmup, a.seconds / a.rounds))

    def measure_streams(self, streams: int) -> list[dict[str, Any]]:
        """Every mode at one stream count, in interleaved rounds so that background load hits all alike."""
        modes = ["bare", *self.args.modes]
        parts: dict[str, list[Part]] = {m: [] for m in modes}
        for r in range(self.args.rounds):
            for mode in modes:
                # the first round warms up fully; later ones only refill the pipeline
                parts[mode].append(
                    self.run(mode, streams, self.args.warmup if r == 0 else min(1.0, self.args.warmup))
                )
        rows = [{"mode": m, **summarise(parts[m], streams)} for m in modes]
        rows[0]["mean_batch"], rows[0]["mean_tick_ms"] = float(streams), rows[0]["latency_ms"]["mean"]
        for row in rows:
            row["ratio_to_bare"] = row["fixations_per_s"] / rows[0]["fixations_per_s"]
        return rows

    def describe(self) -> dict[str, Any]:
        a = self.args
        return {
            "model": self.cfg.to_dict(),
            "dataset": self.dataset,
            "server_env": self.env,
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "json"},
            "http": "raw_b64 JSON; each stream (http) or group of --batch-streams streams (http-batch) "
            "sends its next request when the previous answer came back",
            "redis": f"raw + shape via pipelined XADD, up to {a.window} in flight per stream; "
            "results read from the results stream by entry_id",
        }


def run_all(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Start the servers, run every (streams, mode), stop them; returns the JSON document."""
    bench = Bench(args, workdir)
    doc: dict[str, Any] = {"machine": machine_info(), "config": bench.describe(), "runs": []}
    try:
        bench.start()
        for n in args.streams:
            for row in bench.measure_streams(n):
                doc["runs"].append(row)
                print(_line(row), flush=True)
    finally:
        bench.stop()
    doc["machine"]["loadavg_after"] = os.getloadavg()
    return doc


#: Table columns: CPU milliseconds per fixation of the servers (all processes; the bare learner's own
#: for ``bare``), of their main thread (``serve``: the API's event loop; ``worker``: the tick loop),
#: and of this process (the load); other jobs' CPU in cores; mean fixations per worker tick and its time.
HEADER = (
    f"{'mode':<11}{'streams':>8}{'fix/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>7}{'batch':>7}"
    f"{'tick ms':>9}{'srv cpu':>9}{'main cpu':>9}{'cli cpu':>9}{'bg cores':>9}"
)


def _line(r: dict[str, Any]) -> str:
    cpu, bare = r["cpu_ms_per_fixation"], r["mode"] == "bare"
    server = cpu.get("bench", 0.0) if bare else sum(v for k, v in cpu.items() if k != "bench")
    main = sum(r.get("main_thread_cpu_ms_per_fixation", {}).values())
    client = 0.0 if bare else cpu.get("bench", 0.0)
    return (
        f"{r['mode']:<11}{r['streams']:>8}{r['fixations_per_s']:>9.1f}{r['latency_ms']['p50']:>9.1f}"
        f"{r['latency_ms']['p99']:>9.1f}{r['ratio_to_bare']:>7.2f}{r.get('mean_batch', 0):>7.1f}"
        f"{r.get('mean_tick_ms', 0):>9.1f}{server:>9.2f}{main:>9.2f}{client:>9.2f}"
        f"{r.get('background_cores', 0):>9.2f}"
    )


def _settings_pair(text: str) -> tuple[str, str]:
    from service.config import Settings

    key, sep, value = text.partition("=")
    if not sep or key.lower() not in Settings.model_fields:
        raise argparse.ArgumentTypeError(
            f"--set takes KEY=VALUE with KEY a Settings field (max_wait_ms=5), got {text!r}"
        )
    return key.lower(), value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.service_speed", description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16, 128], help="concurrent streams")
    p.add_argument("--modes", nargs="*", choices=MODES, default=["http", "redis"], help="besides bare")
    p.add_argument("--seconds", type=float, default=20.0, help="measured window per run")
    p.add_argument("--warmup", type=float, default=5.0, help="load before the window, not counted")
    p.add_argument("--rounds", type=int, default=2, help="interleave the modes in this many rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the servers and the bare learner")
    p.add_argument("--server-threads", type=int, help="torch threads in the servers if not --threads")
    p.add_argument("--window", type=int, default=1, help="redis: fixations in flight per stream")
    p.add_argument("--batch-streams", type=int, default=16, help="http-batch: streams per request")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw", help="HTTP client of the load")
    p.add_argument("--patches", type=int, default=256, help="distinct OSIE patches to cycle through")
    p.add_argument(
        "--set",
        type=_settings_pair,
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="service Settings for the servers (FOVEATE_KEY) and the bare learner's model",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--workdir", type=Path, help="server logs (default: a temporary folder)")
    args = p.parse_args(argv)
    args.set = dict(args.set)
    if (
        min(args.streams) < 1
        or args.threads < 1
        or args.window < 1
        or args.batch_streams < 1
        or args.rounds < 1
    ):
        p.error("--streams, --threads, --window, --batch-streams and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="service_speed-") as tmp:
        doc = run_all(args, args.workdir or Path(tmp))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
