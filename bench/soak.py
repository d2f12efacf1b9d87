"""Soak: 64 rigs at twice the sustainable rate for minutes; memory, refusals and latency over time.

Issue 16 asks whether an overloaded foveate stays healthy: its memory flat, its refusals explicit
(429 with ``Retry-After``, not 504 after a long wait), the accepted fixations answered promptly. One
run:

1. starts the server: ``foveate serve`` (embedded: API and worker in one process), or with
   ``--redis`` a ``redis-server``, ``foveate worker`` and ``foveate api`` (three processes); with
   checkpoints every ``--checkpoint-interval-s`` (60) seconds into the run's folder, so that the
   background writer and its snapshot are soaked too;
2. **calibrates** (skip with ``--rate``): ``--streams`` calibration streams each post their next
   fixation when the previous answer is back, for ``--calibrate-s`` after 5 s of warm-up; the
   answers per second are the *sustainable rate*. The calibration streams are deleted afterwards;
3. **soaks** for ``--minutes`` at ``--overload`` (2) times that rate with the load of
   ``bench/_rig_load.py``: every stream produces fixations on its own clock into a rig's buffer
   (``--buffer``, the oldest shed beyond it) and keeps one request in flight, sending what waits as
   one ordered batch (``POST /v1/fixations/batch``, ``wait=true``, ``seq`` on every item, at most
   ``--batch-cap``), as docs/clients.md tells users; the SDK retries 429/503 after ``Retry-After``
   within ``--max-wait`` seconds. The streams are dealt over ``--load-procs`` processes;
4. samples every ``--sample-s`` seconds each server process's memory (``/proc/PID/status``: RSS,
   anonymous, file-backed; ``/proc/PID/smaps``: the anonymous part split into malloc's main heap,
   its secondary arenas and other mappings), ``/readyz``, the worker's queue, fixations applied,
   tick width and tick time, seq gaps, the checkpoint metrics and the server's own answer time
   for the batch route; at the end ``/proc/PID/smaps_rollup``.

Per minute (of production) it reports fixations produced, answered and learned, answered but not
learned (``duplicate``/``late``: should be 0), refused for good (429 after the retries), timed out
(504), other 5xx, shed by the rigs, unsent (in a buffer when the clock ran out), the SDK's 429
retries, p50/p99 latency (due time to answer, retries and buffer wait included), batches, the
producer clock's lag (p99, max) and each server process's peak RSS / anonymous / file-backed
memory. Memory growth is given two ways: issue 16's (the last minute's peak over the first
minute's) and after warm-up (the last minute's peak over minute ``--warm-minute``'s). Each load
process's CPU (cores) is reported beside the server's: the load must keep its clock, or the soak
measures the client.

``--batch-cap`` (default 8) is how many of its fixations a rig sends at once. A stream gets one
fixation a worker tick, so a batch of k of one stream needs k ticks: the API refuses (429, with
``Retry-After`` and the number that fits) a waiting batch whose stream would need more ticks than
fit in ``FOVEATE_SYNC_TIMEOUT_S`` (before that check, batches of 64 with ticks of ~0.5 s were
accepted and answered 504: docs/results.md). 8 fits ticks up to 1.25 s; with one request in flight
a stream, the overload then waits in the rigs' buffers, and is shed there, not at the server.

``--server-env MALLOC_ARENA_MAX=2`` sets the server's environment (here: glibc's malloc arenas);
``--tracemalloc S`` snapshots the server's Python allocations every S seconds
(bench/_memtrace/sitecustomize.py) and prints what grew between the snapshot after warm-up and the
last one (slow: for diagnosis, not for figures).

The final runs (10 minutes; a quiet machine; the second line for the Redis mode)::

    python -m bench.soak --minutes 10 --threads 1 --load-procs 2 --json runs/bench/soak.json
    python -m bench.soak --minutes 10 --threads 1 --load-procs 2 --redis --json runs/bench/soak-redis.json
    python -m bench.soak --minutes 2 --calibrate-s 10 --threads 1                     # a short run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import tempfile
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench._rig_load import LoadMinute, LoadProcesses, LoadReport, LoadSpec, split_streams
from bench._servers import (
    REPO_ROOT,
    FoveateProcess,
    RedisServer,
    cpu_seconds,
    machine_busy_seconds,
    start_http,
    start_serve,
    start_worker,
)
from clients import sdk

MEMTRACE_PATH = REPO_ROOT / "bench" / "_memtrace"
#: The route the rigs post to, as the server's request histogram labels it.
BATCH_ROUTE = "/v1/fixations/batch"


def proc_status(pid: int) -> dict[str, int]:
    """A process's resident memory from ``/proc/PID/status``, bytes: ``VmRSS`` and its parts
    ``RssAnon`` (heap, tensors), ``RssFile`` (libraries and files paged in), ``RssShmem``."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    if "VmRSS" not in out:
        raise RuntimeError(f"no VmRSS for process {pid}")
    return {"RssAnon": 0, "RssFile": 0, "RssShmem": 0, **out}


def smaps_rollup(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in kB (Rss, Pss, Anonymous, Private_Dirty, ...), {} where unreadable."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key.strip()] = int(value.split()[0])
    return out


#: glibc's malloc reserves a secondary arena (one per thread that allocated, up to 8 per core) as
#: one 64 MB mapping (``HEAP_MAX_SIZE``); its unused part is mapped ``---p``.
ARENA_BYTES = 64 * 2**20


def anon_breakdown(pid: int) -> dict[str, float]:
    """Where a process's anonymous resident memory lies, MB, from ``/proc/PID/smaps``: ``heap``
    (the main arena, ``[heap]``), ``arenas`` (the 64 MB-aligned pieces glibc's secondary arenas, one
    per allocating thread, are carved from: their ``rw-p`` part and its ``---p`` reserve are counted
    together by start address), ``large`` (other anonymous mappings: allocations over the mmap
    threshold, tensors among them), and ``arena_count``. {} where unreadable."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return {}
    out = {"heap": 0.0, "arenas": 0.0, "large": 0.0, "arena_count": 0.0}
    kind = None
    for line in text.splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's first line
            start, end = (int(x, 16) for x in head[0].split("-"))
            name = head[5] if len(head) > 5 else ""
            kind = None
            if name == "[heap]":
                kind = "heap"
            elif not name:
                kind = "arenas" if start % ARENA_BYTES == 0 and end - start <= ARENA_BYTES else "large"
                out["arena_count"] += kind == "arenas" and head[1].startswith("rw")
        elif head[0] == "Anonymous:" and kind is not None:
            out[kind] += int(head[1]) / 1024
    return out


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def ms(value: float | None) -> float | None:
    return None if value is None else 1000.0 * value


@dataclass
class ServerMinute:
    """What the sampler saw of the server in one minute of the soak."""

    rss: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)  # process: (rss, anon, file)
    queue: list[float] = field(default_factory=list)
    not_ready: int = 0  # samples whose /readyz was not 200 (or not answered)
    sample_errors: Counter[str] = field(default_factory=Counter)
    samples: int = 0
    route: list[tuple[float, float]] = field(default_factory=list)  # the batch route's (sum, count)
    gauges: list[dict[str, float]] = field(default_factory=list)  # checkpoint samples
    anon: dict[str, dict[str, float]] = field(default_factory=dict)  # process: its last anon_breakdown

    def delta(self, name: str) -> float | None:
        """How much a counter in ``gauges`` grew over this minute's samples."""
        values = [g[name] for g in self.gauges if name in g]
        return values[-1] - values[0] if len(values) >= 2 else None

    def mean(self, histogram: str) -> float | None:
        """A histogram's mean over the observations made in this minute (None: none made)."""
        count, total = self.delta(f"{histogram}_count"), self.delta(f"{histogram}_sum")
        return None if not count or total is None else total / count

    def server_ms(self) -> float | None:
        """Mean time the server took to answer a batch in this minute (its own histogram)."""
        if len(self.route) < 2 or self.route[-1][1] <= self.route[0][1]:
            return None
        (s0, n0), (s1, n1) = self.route[0], self.route[-1]
        return 1000.0 * (s1 - s0) / (n1 - n0)

    def memory(self) -> dict[str, dict[str, float]]:
        """Each process's peak RSS, anonymous and file-backed memory in this minute, MB."""
        return {
            name: {part: max(s[k] for s in samples) / 2**20 for k, part in enumerate(("rss", "anon", "file"))}
            for name, samples in self.rss.items()
            if samples
        }


def summarize_minute(index: int, load: LoadMinute, srv: ServerMinute, seconds: float) -> dict[str, Any]:
    answered = load.outcomes.get("ok", 0)
    stall = srv.mean("foveate_checkpoint_stall_seconds")
    return {
        "minute": index + 1,
        "produced": load.produced,
        "answered": answered,
        "answered_per_s": answered / seconds,
        "not_learned": load.kinds.get("not_learned", 0),
        "refused": load.kinds.get("refused", 0),
        "timed_out": load.kinds.get("timed_out", 0),
        "server_5xx": load.kinds.get("server_5xx", 0),
        "other_errors": load.kinds.get("other", 0),
        "shed": load.shed,
        "unsent": load.unsent,
        "errors": dict(load.outcomes - Counter(ok=answered)),
        "retries": dict(load.retries),
        "requests": load.requests,
        "batch_mean": load.batch_items / load.requests if load.requests else None,
        "p50_ms": ms(percentile(load.latencies, 50)),
        "p99_ms": ms(percentile(load.latencies, 99)),
        "lag_p99_ms": ms(percentile(load.lag, 99)),
        "lag_max_ms": ms(max(load.lag)) if load.lag else None,
        "server_ms_mean": srv.server_ms(),
        "memory_mb": srv.memory(),
        "queue_max": max(srv.queue) if srv.queue else None,
        "not_ready_share": srv.not_ready / srv.samples if srv.samples else None,
        "sample_errors": dict(srv.sample_errors),
        "anon_breakdown_mb": srv.anon,
        "worker_applied_per_s": (srv.delta("foveate_fixations_total") or 0.0) / seconds,
        "tick_width_mean": srv.mean("foveate_batch_size"),
        "tick_ms_mean": ms(srv.mean("foveate_update_seconds")),
        "seq_gaps": srv.delta("foveate_seq_gaps_total"),
        "checkpoints": srv.delta("foveate_checkpoints_total"),
        "checkpoint_s_mean": srv.mean("foveate_checkpoint_seconds"),
        "stall_ms_mean": ms(stall),
    }


#: ``/metrics`` samples kept per soak sample: the checkpoint writer's counters and histograms, the
#: worker's fixations applied, its ticks' width and duration, and its seq gaps (the rigs' shedding).
CHECKPOINT_SAMPLES = (
    "foveate_checkpoints_total",
    "foveate_checkpoint_seconds_sum",
    "foveate_checkpoint_seconds_count",
    "foveate_checkpoint_stall_seconds_sum",
    "foveate_checkpoint_stall_seconds_count",
    "foveate_checkpoint_bytes",
    "foveate_checkpoint_written_bytes",
    # the worker's own throughput and tick width, by wall-clock minute
    "foveate_fixations_total",
    "foveate_batch_size_sum",
    "foveate_batch_size_count",
    "foveate_update_seconds_sum",
    "foveate_update_seconds_count",
    "foveate_seq_gaps_total",
)


async def server_gauges(
    http: httpx.AsyncClient, urls: list[str]
) -> tuple[float, tuple[float, float], dict[str, float]]:
    """The worker's queue depth, (sum, count) of the batch route's answer-time histogram, and the
    checkpoint samples (``CHECKPOINT_SAMPLES``, and the two histograms' buckets as ``name{le}``),
    from the ``/metrics`` of each URL (the API's and, in Redis mode, the worker's)."""
    from prometheus_client.parser import text_string_to_metric_families

    depth, total, count = float("nan"), 0.0, 0.0
    gauges: dict[str, float] = {}
    for url in urls:
        for family in text_string_to_metric_families((await http.get(url)).text):
            for s in family.samples:
                if s.name == "foveate_queue_depth":
                    depth = float(s.value)
                elif s.name in CHECKPOINT_SAMPLES:
                    gauges[s.name] = float(s.value)
                elif s.name.startswith("foveate_checkpoint") and s.name.endswith("_bucket"):
                    gauges[f"{s.name}{{{s.labels['le']}}}"] = float(s.value)
                elif (
                    s.name.startswith("foveate_http_request_duration_seconds")
                    and s.labels.get("route") == BATCH_ROUTE
                ):
                    if s.name.endswith("_sum"):
                        total = float(s.value)
                    elif s.name.endswith("_count"):
                        count = float(s.value)
    return depth, (total, count), gauges


def checkpoint_summary(g: dict[str, float]) -> dict[str, Any]:
    """The checkpoint writer's totals from one ``/metrics`` sample: count, mean write and stall time,
    and the smallest bucket bound that holds every write and stall (the histograms keep no maximum)."""

    def upper(histogram: str) -> float | None:
        count = g.get(f"{histogram}_count", 0.0)
        bounds = sorted(
            (float(k[len(histogram) + 8 : -1]), v)
            for k, v in g.items()
            if k.startswith(f"{histogram}_bucket{{")
        )
        return next((le for le, v in bounds if v >= count), None) if count else None

    def mean(histogram: str) -> float | None:
        count = g.get(f"{histogram}_count", 0.0)
        return g.get(f"{histogram}_sum", 0.0) / count if count else None

    return {
        "written": g.get("foveate_checkpoints_total"),
        "write_s_mean": mean("foveate_checkpoint_seconds"),
        "write_s_at_most": upper("foveate_checkpoint_seconds"),
        "stall_s_mean": mean("foveate_checkpoint_stall_seconds"),
        "stall_s_at_most": upper("foveate_checkpoint_stall_seconds"),
        "bytes_last": g.get("foveate_checkpoint_bytes"),
    }


def load_patches(size: int, count: int = 256) -> tuple[list[np.ndarray], str]:
    """Real patches from the recorded data set when it is there, else random ones (same cost)."""
    try:
        from bench.service_speed import load_patches as recorded

        return recorded(size, count)
    except (OSError, FileNotFoundError, ValueError) as exc:
        rng = np.random.default_rng(0)
        return [
            rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)
        ], f"random ({exc})"


class Servers:
    """The server under soak: ``foveate serve``, or redis-server + ``foveate worker`` + ``foveate api``."""

    def __init__(self, args: argparse.Namespace, workdir: Path, env: dict[str, str]) -> None:
        self.stack = contextlib.ExitStack()
        self.procs: dict[str, FoveateProcess | RedisServer] = {}
        try:
            self._start(args, workdir, env)
        except BaseException:
            self.stack.close()  # a worker that never beat must not leave its redis-server behind
            raise

    def _start(self, args: argparse.Namespace, workdir: Path, env: dict[str, str]) -> None:
        if not args.redis:
            serve = self.stack.enter_context(start_serve(workdir, env))
            self.procs["serve"] = serve
            self.url, self.metrics = serve.url, [serve.metrics_url]
            return
        redis_srv = self.stack.enter_context(RedisServer.start_in(workdir))
        env = {**env, "FOVEATE_REDIS_URL": redis_srv.url, "FOVEATE_CONTROL_SECRET": secrets.token_hex(16)}
        worker = self.stack.enter_context(start_worker(redis_srv.url, workdir, env))
        api = self.stack.enter_context(start_api(redis_srv.url, workdir, env))
        self.procs = {"api": api, "worker": worker, "redis": redis_srv}
        self.url, self.metrics = api.url, [api.metrics_url, worker.metrics_url]

    def pids(self) -> dict[str, int]:
        out = {}
        for name, proc in self.procs.items():
            pid = proc.pid if isinstance(proc, FoveateProcess) else getattr(proc.process, "pid", None)
            if pid is not None:
                out[name] = pid
        return out

    def close(self) -> None:
        self.stack.close()


def start_api(
    redis_url: str, workdir: Path, env: dict[str, str], *, timeout: float = 180.0
) -> FoveateProcess:
    """``foveate api --redis URL`` on a free port, once ``/readyz`` is 200 (a worker is beating)."""
    return start_http(["api", "--redis", redis_url], workdir, "api", env, timeout)


async def calibrate(url: str, streams: int, seconds: float, warmup: float) -> float:
    """Answers per second with one fixation in flight per stream, after ``warmup`` seconds; the
    calibration streams are deleted afterwards so that the soak's streams start alone."""
    patch = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    counted = 0
    end_warm = time.monotonic() + warmup
    end = end_warm + seconds

    async def stream(client: sdk.AsyncFoveateClient, i: int) -> None:
        nonlocal counted
        seq = 0
        while time.monotonic() < end:
            result = await client.post_fixation(f"calibrate-{i}", patch, seq=seq, reset=seq == 0)
            if result.status != "applied":
                raise RuntimeError(f"calibration got {result.status}: the server is not healthy")
            counted += time.monotonic() > end_warm
            seq += 1

    async with sdk.AsyncFoveateClient(url, timeout=60.0, encoding="raw") as client:
        await asyncio.gather(*(stream(client, i) for i in range(streams)))
        await asyncio.gather(*(client.delete(f"calibrate-{i}") for i in range(streams)))
    return counted / seconds


async def sample(servers: Servers, book: list[ServerMinute], start: float, end: float, every: float) -> None:
    """Memory, /readyz, queue and checkpoint metrics every ``every`` seconds until ``end``."""
    pids = {k: v for k, v in servers.pids().items() if k != "redis"}
    async with httpx.AsyncClient(base_url=servers.url, timeout=30.0) as http:
        while time.monotonic() < end:
            minute = book[min(len(book) - 1, int((time.monotonic() - start) // 60))]
            for name, pid in pids.items():
                mem = proc_status(pid)
                minute.rss.setdefault(name, []).append(
                    (mem["VmRSS"], mem["RssAnon"], mem["RssFile"] + mem["RssShmem"])
                )
                minute.anon[name] = anon_breakdown(pid)
            minute.samples += 1
            try:
                ready = await http.get("/readyz")
                minute.not_ready += ready.status_code != 200
                depth, route, gauges = await server_gauges(http, servers.metrics)
            except httpx.TransportError as exc:  # counted: an overloaded server may drop one
                minute.sample_errors[type(exc).__name__] += 1
                minute.not_ready += 1
            else:
                minute.queue.append(depth)
                minute.route.append(route)
                minute.gauges.append(gauges)
            await asyncio.sleep(max(0.0, min(every, end - time.monotonic())))


def growth(peaks: list[float], warm_minute: int) -> dict[str, float | None]:
    """Issue 16's growth (last minute's peak over the first's) and the growth after warm-up (over
    minute ``warm_minute``'s peak, 1-based), as fractions."""
    if len(peaks) < 2:
        return {"issue": None, "after_warmup": None}
    warm = peaks[min(warm_minute, len(peaks)) - 1]
    return {"issue": peaks[-1] / peaks[0] - 1.0, "after_warmup": peaks[-1] / warm - 1.0}


def tracemalloc_diff(folder: Path, warm_minute: int, every_s: float, top: int = 15) -> dict[str, Any]:
    """What the server's Python allocations gained between the snapshot at the end of minute
    ``warm_minute - 1`` (after warm-up; the first is taken ``every_s`` after the load began) and the
    last one; the biggest lines first."""
    snaps = sorted(folder.glob("snap-*.pickle"))
    if len(snaps) < 2:
        return {"snapshots": len(snaps)}
    first = min(len(snaps) - 2, max(0, int(60.0 * (warm_minute - 1) / every_s) - 1))  # taken every_s apart
    old, new = (tracemalloc.Snapshot.load(str(snaps[k])) for k in (first, -1))
    stats = new.compare_to(old, "lineno")
    return {
        "snapshots": [snaps[first].name, snaps[-1].name],
        "traced_mb": [sum(s.size for s in snap.statistics("filename")) / 2**20 for snap in (old, new)],
        "top_growth": [
            {"where": str(s.traceback), "kb": s.size_diff / 1024, "count": s.count_diff} for s in stats[:top]
        ],
    }


def server_env(args: argparse.Namespace, workdir: Path) -> dict[str, str]:
    env = {
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "FOVEATE_TORCH_THREADS": str(args.threads),
        "FOVEATE_CHECKPOINT_PATH": str(workdir / "checkpoints" / "foveate.pt")
        if args.checkpoint_interval_s > 0
        else "",
        "FOVEATE_CHECKPOINT_INTERVAL_S": str(args.checkpoint_interval_s or 300.0),
        "FOVEATE_LOG_LEVEL": "WARNING",
        **{f"FOVEATE_{k.upper()}": v for k, v in args.set.items()},
        **args.server_env,
    }
    if args.tracemalloc:
        path = os.pathsep.join(p for p in (str(MEMTRACE_PATH), os.environ.get("PYTHONPATH", "")) if p)
        env |= {"PYTHONPATH": path, "FOVEATE_BENCH_TRACEMALLOC_DIR": str(workdir / "tracemalloc"),
                "FOVEATE_BENCH_TRACEMALLOC_S": str(args.tracemalloc)}  # fmt: skip
    return env


async def soak(
    args: argparse.Namespace, servers: Servers, rate: float, patches: list[np.ndarray], workdir: Path
) -> dict[str, Any]:
    """The soak proper: the load processes at ``rate * overload``, the sampler beside them."""
    offered = rate * args.overload
    specs = [
        LoadSpec(servers.url, streams, args.streams / offered, args.minutes, args.batch_cap, args.buffer,
                 args.max_wait, patches, seed=16 + k)
        for k, streams in enumerate(split_streams(args.streams, args.load_procs))
    ]  # fmt: skip
    procs = LoadProcesses(specs)
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, procs.start)
        n_min = max(1, int(np.ceil(args.minutes)))
        book = [ServerMinute() for _ in range(n_min)]
        pids = servers.pids()
        srv0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        busy0 = machine_busy_seconds()
        start = time.monotonic() + 1.0  # time for every process to get the word
        procs.go(start)
        if args.tracemalloc:  # bench/_memtrace: the server's tracing starts with the load
            (workdir / "tracemalloc" / "start").touch()
        end = start + 60.0 * args.minutes
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        await sample(servers, book, start, end, args.sample_s)
        # the load processes exit once their last answers are in; their CPU is read just before
        reports: list[LoadReport] = await loop.run_in_executor(
            None, procs.reports, 60.0 * args.minutes + 600.0
        )
        busy1 = machine_busy_seconds()
        srv1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    finally:
        procs.stop()
    load = [LoadMinute() for _ in range(n_min)]
    for report in reports:
        for mine, theirs in zip(load, report.minutes, strict=True):
            mine.merge(theirs)
    seconds = [60.0] * (n_min - 1) + [60.0 * (args.minutes - (n_min - 1))]
    doc: dict[str, Any] = {"offered_per_s": offered}
    doc["minutes"] = [
        summarize_minute(i, lm, sm, s) for i, (lm, sm, s) in enumerate(zip(load, book, seconds, strict=True))
    ]
    doc["load_processes"] = [
        {"streams": r.streams, "cpu_cores": r.cpu_s / r.wall_s, "wall_s": r.wall_s,
         "lag_p99_ms": ms(percentile([x for m in r.minutes for x in m.lag], 99)),
         "lag_max_ms": ms(max((x for m in r.minutes for x in m.lag), default=0.0))}
        for r in reports
    ]  # fmt: skip
    if busy0 and busy1 and all(v is not None for v in (*srv0.values(), *srv1.values())):
        cores = os.cpu_count() or 1
        per_core = (busy1[1] - busy0[1]) / cores  # wall seconds
        doc["cpu"] = {"machine_busy_cores": (busy1[0] - busy0[0]) / per_core,
                      **{f"{name}_cores": (srv1[name] - srv0[name]) / per_core for name in pids}}  # type: ignore[operator]  # fmt: skip
    doc["_load"] = load
    return doc


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from service.config import Settings

    size = Settings(**args.set).model_config_obj().input_size
    patches, dataset = load_patches(size)
    doc: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "dataset": dataset,
                           "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}  # fmt: skip
    servers = Servers(args, workdir, server_env(args, workdir))
    try:
        rate = args.rate
        if rate is None:
            rate = await calibrate(servers.url, args.streams, args.calibrate_s, warmup=5.0)
            print(
                f"sustainable: {rate:.1f} fixations/s ({args.streams} streams, one in flight each)",
                flush=True,
            )
        doc["sustainable_per_s"] = rate
        doc |= await soak(args, servers, rate, patches, workdir)
        async with httpx.AsyncClient(timeout=30.0) as http:
            doc["checkpoints"] = checkpoint_summary((await server_gauges(http, servers.metrics))[2])
        doc["smaps_rollup_end"] = {n: smaps_rollup(p) for n, p in servers.pids().items() if n != "redis"}
    finally:
        servers.close()
    load: list[LoadMinute] = doc.pop("_load")
    mems = [m["memory_mb"] for m in doc["minutes"]]
    doc["memory_growth"] = {
        f"{name} {part}": growth([m[name][part] for m in mems if name in m], args.warm_minute)
        for name in mems[0]
        for part in ("rss", "anon", "file")
    }
    lat = [x for m in load for x in m.latencies]
    total = sum((m.kinds for m in load), Counter())
    doc["total"] = {
        "produced": sum(m.produced for m in load),
        "answered": total.get("ok", 0),
        "shed": sum(m.shed for m in load),
        "unsent": sum(m.unsent for m in load),
        **{k: total.get(k, 0) for k in ("not_learned", "refused", "timed_out", "server_5xx", "other")},
        "outcomes": dict(sum((m.outcomes for m in load), Counter())),
        "retries": dict(sum((m.retries for m in load), Counter())),
        "p50_ms": ms(percentile(lat, 50)),
        "p99_ms": ms(percentile(lat, 99)),
        "answered_per_s": total.get("ok", 0) / (60.0 * args.minutes),
    }
    if args.tracemalloc:
        doc["tracemalloc"] = tracemalloc_diff(workdir / "tracemalloc", args.warm_minute, args.tracemalloc)
    doc["loadavg_end"] = os.getloadavg()
    return doc


def _cell(value: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def print_table(doc: dict[str, Any]) -> None:
    procs = list(doc["minutes"][0]["memory_mb"])
    columns = ["minute", "produced", "learned", "learned/s", "not learned", "refused", "timed out",
               "5xx", "other", "shed", "unsent", "429 retries", "batches", "batch mean", "p50 ms",
               "p99 ms", "server ms", "worker applied/s", "tick width", "tick ms", "lag p99 ms",
               "lag max ms", "queue max", "not ready", "ckpts",
               "stall ms"]  # fmt: skip
    columns += [f"{p} {part} MB" for p in procs for part in ("RSS", "anon", "file")]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for m in doc["minutes"]:
        retries = sum(v for k, v in m["retries"].items() if k.startswith("HTTP 429"))
        cells = [m["minute"], _cell(m["produced"]), _cell(m["answered"]), f"{m['answered_per_s']:.1f}",
                 m["not_learned"], m["refused"], m["timed_out"], m["server_5xx"], m["other_errors"],
                 _cell(m["shed"]), _cell(m["unsent"]), _cell(retries), _cell(m["requests"]),
                 _cell(m["batch_mean"], "{:.1f}"), _cell(m["p50_ms"]), _cell(m["p99_ms"]),
                 _cell(m["server_ms_mean"]), _cell(m["worker_applied_per_s"], "{:.1f}"),
                 _cell(m["tick_width_mean"], "{:.1f}"), _cell(m["tick_ms_mean"]),
                 _cell(m["lag_p99_ms"], "{:.1f}"), _cell(m["lag_max_ms"], "{:.1f}"),
                 _cell(m["queue_max"]), _cell(m["not_ready_share"], "{:.0%}"), _cell(m["checkpoints"]),
                 _cell(m["stall_ms_mean"], "{:.1f}")]  # fmt: skip
        for p in procs:
            mem = m["memory_mb"].get(p, {})
            cells += [_cell(mem.get(part), "{:,.1f}") for part in ("rss", "anon", "file")]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    for m in doc["minutes"]:
        parts = [f"{p}: heap {b['heap']:,.0f}, arenas {b['arenas']:,.0f} ({b['arena_count']:.0f}), "
                 f"other anonymous {b['large']:,.0f}"
                 for p, b in m["anon_breakdown_mb"].items() if b]  # fmt: skip
        print(f"anonymous MB at the end of minute {m['minute']}: " + "; ".join(parts))
    for name, g in doc["memory_growth"].items():
        warm = doc["args"]["warm_minute"]
        print(f"growth {name}: issue 16 (last minute / first) {_cell(g['issue'], '{:+.1%}')}, "
              f"after warm-up (last / minute {warm}) {_cell(g['after_warmup'], '{:+.1%}')}")  # fmt: skip
    print(f"total: {json.dumps(doc['total'])}")
    print(f"load processes: {json.dumps(doc['load_processes'])}")
    print(f"cpu: {json.dumps(doc.get('cpu'))}")
    print(f"checkpoints: {json.dumps(doc.get('checkpoints'))}")
    print(f"smaps_rollup at the end (kB): {json.dumps(doc.get('smaps_rollup_end'))}")
    if "tracemalloc" in doc:
        print(f"tracemalloc: {json.dumps(doc['tracemalloc'], indent=1)}")
    print(f"sustainable {doc['sustainable_per_s']:.1f}/s, offered {doc['offered_per_s']:.1f}/s; "
          f"load average: start {doc['loadavg_start']}, end {doc['loadavg_end']}")  # fmt: skip


def _pairs(p: argparse.ArgumentParser, items: list[str], what: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in items]
    if any(len(pair) != 2 for pair in pairs):
        p.error(f"{what} takes KEY=VALUE pairs")
    return dict(pairs)  # type: ignore[arg-type]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the soak")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--overload", type=float, default=2.0, help="offered rate over the sustainable rate")
    p.add_argument("--rate", type=float, help="the sustainable rate (fixations/s); measured when left out")
    p.add_argument("--calibrate-s", type=float, default=30.0, help="calibration window after 5 s warm-up")
    p.add_argument("--batch-cap", type=int, default=8, help="fixations in one request of a stream at most")
    p.add_argument("--buffer", type=int, default=256, help="a rig's buffer; beyond it the oldest are shed")
    p.add_argument("--load-procs", type=int, default=2, help="processes the streams are dealt over")
    p.add_argument("--redis", action="store_true", help="redis-server + foveate worker + foveate api")
    p.add_argument("--checkpoint-interval-s", type=float, default=60.0,
                   help="the server's checkpoint interval; 0: no checkpoints")  # fmt: skip
    p.add_argument("--max-wait", type=float, default=30.0, help="SDK: seconds of Retry-After waits in all")
    p.add_argument("--sample-s", type=float, default=5.0, help="memory, /readyz and queue sampling period")
    p.add_argument("--warm-minute", type=int, default=2, help="growth after warm-up: over this minute's peak")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="service Settings (FOVEATE_KEY)")
    p.add_argument("--server-env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more environment for the server processes, e.g. MALLOC_ARENA_MAX=2")  # fmt: skip
    p.add_argument("--tracemalloc", type=float, metavar="S",
                   help="snapshot the server's Python allocations every S s, diff them (slow)")  # fmt: skip
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--workdir", type=Path, help="server logs (default: a temporary folder)")
    args = p.parse_args(argv)
    args.set = {k.lower(): v for k, v in _pairs(p, args.set, "--set").items()}
    args.server_env = _pairs(p, args.server_env, "--server-env")
    if args.minutes <= 0 or args.overload <= 0:
        p.error("--minutes and --overload must be > 0")
    if min(args.streams, args.batch_cap, args.buffer, args.load_procs, args.warm_minute) < 1:
        p.error("--streams, --batch-cap, --buffer, --load-procs and --warm-minute must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        doc = asyncio.run(run(args, args.workdir or Path(tmp)))
    print_table(doc)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
