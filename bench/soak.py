"""Soak: many streams at twice the sustainable rate for minutes; memory, refusals and latency over time.

Issue 16 asks whether an overloaded foveate stays healthy: its memory flat, its refusals explicit
(429 with ``Retry-After``, not 504 after a long wait), the accepted fixations answered promptly. One
run:

1. starts ``foveate serve`` (embedded: API and worker in one process) with checkpoints on, every
   ``--checkpoint-interval-s`` (60) seconds into a temporary folder, so that the background writer and
   its copy-on-write snapshot are soaked too;
2. **calibrates**: every stream posts its next fixation when the previous answer is back (one in
   flight each, as fast as the service goes) for ``--calibrate-s``; the answers per second are the
   *sustainable rate* (skip with ``--rate``);
3. **soaks** for ``--minutes`` at ``--overload`` (2) times that rate: each stream, like an eye
   tracker, produces fixations on a clock (evenly spaced, a random phase per stream) and sends each
   with the SDK (``AsyncFoveateClient``, ``wait=true``, its ``seq``), which retries 429/503 after the
   server's ``Retry-After`` within ``--max-wait`` seconds in all. A stream keeps at most ``--window``
   (64) fixations in flight; one produced while the window is full is dropped by the client (a rig's
   full buffer) and counted as *shed*. The window is wide on purpose: the overload must reach the
   *server* (its backlog passing what the worker serves within ``FOVEATE_SYNC_TIMEOUT_S``), so that
   its own back-pressure is what answers it: 429 ``QueueFull`` with ``Retry-After``, ``/readyz`` 503.
   (A window of 4, the first version, kept 256 fixations in flight at most: the queue never passed
   9 and the server never refused anything; the clients shed the overload instead.) Fixations of
   one stream in flight together can overtake each other; with ``seq`` the worker answers one that
   arrives after a later one of its stream was applied as ``already_applied``, not learned, and the
   soak counts it as *not learned*. ``--no-seq`` sends without ``seq``: every fixation is learned
   (the worker does the whole overload's work), in the order it arrives, but the SDK cannot resend
   one whose connection dropped (counted under its transport error);
4. samples the server's RSS (``/proc/PID/status``), ``/readyz``, its queue depth and its own
   answer time for the fixation route (``/metrics``) every ``--sample-s`` seconds, and reports per
   minute: fixations produced, answered (learned), not learned, refused for good (429 after the
   retries), timed out
   (504), other server errors (5xx), shed, the SDK's retries (by reason), p50/p99 latency
   (production to answer, retries included), the server's mean answer time (the rest of the
   latency was spent in the client or waiting for the server to accept), RSS (and its anonymous
   and file-backed parts, to tell heap growth from libraries and files paged in), the checkpoints
   written and their write and stall times (``foveate_checkpoint_*``).

RSS growth is the last minute's peak over the first minute's peak, as issue 16 words it. The
benchmark's own process shares the machine with the server; both CPU totals and the load average
are in the JSON.

    python -m bench.soak --minutes 10 --threads 1 --no-seq --sample-s 3 --json runs/bench/soak.json
    python -m bench.soak --minutes 1 --calibrate-s 10 --threads 1              # a short run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench._servers import cpu_seconds, machine_busy_seconds, start_serve
from clients import sdk


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


def kind_of(exc: Exception) -> str:
    """What became of a fixation the SDK gave up on: ``refused`` (429: the server's back-pressure,
    still refusing when ``--max-wait`` ran out), ``timed_out`` (504: accepted, not answered within
    ``FOVEATE_SYNC_TIMEOUT_S``, or the client's own timeout), ``server_5xx`` (any other 5xx),
    ``other`` (transport, 4xx)."""
    if isinstance(exc, sdk.Overloaded):
        return "refused"
    if isinstance(exc, (sdk.WorkerTimeout, sdk.RequestTimeout)):
        return "timed_out"
    if isinstance(exc, sdk.ServerError) or getattr(exc, "status_code", 0) >= 500:
        return "server_5xx"
    return "other"


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


@dataclass
class Minute:
    """What happened to the fixations produced in one minute of the soak."""

    produced: int = 0
    shed: int = 0
    unsent: int = 0  # due before the end, but the client's loop reached them only after it
    outcomes: Counter[str] = field(default_factory=Counter)  # "ok", or the SDK error's class name
    kinds: Counter[str] = field(default_factory=Counter)  # ok / refused / timed_out / server_5xx / other
    retries: Counter[str] = field(default_factory=Counter)  # the SDK's retries in this minute, by reason
    latencies: list[float] = field(default_factory=list)  # seconds, answered ones
    rss: list[int] = field(default_factory=list)
    rss_anon: list[int] = field(default_factory=list)
    rss_file: list[int] = field(default_factory=list)
    queue: list[float] = field(default_factory=list)
    not_ready: int = 0  # samples whose /readyz was not 200 (or not answered)
    sample_errors: Counter[str] = field(default_factory=Counter)  # /readyz or /metrics not answered
    samples: int = 0
    seconds: float = 60.0  # the last minute of a run of --minutes 2.5 lasts 30 s
    server: list[tuple[float, float]] = field(default_factory=list)  # the fixation route's (sum, count)
    gauges: list[dict[str, float]] = field(default_factory=list)  # /metrics samples (checkpoints)

    def summary(self, index: int) -> dict[str, Any]:
        answered = self.outcomes.get("ok", 0)
        return {
            "minute": index + 1,
            "produced": self.produced,
            "answered": answered,
            "shed": self.shed,
            "unsent": self.unsent,
            "not_learned": self.kinds.get("not_learned", 0),
            "refused": self.kinds.get("refused", 0),
            "timed_out": self.kinds.get("timed_out", 0),
            "server_5xx": self.kinds.get("server_5xx", 0),
            "other_errors": self.kinds.get("other", 0),
            "errors": dict(self.outcomes - Counter(ok=answered)),
            "retries": dict(self.retries),
            "answered_per_s": answered / self.seconds,
            "p50_ms": None if not self.latencies else 1000 * percentile(self.latencies, 50),  # type: ignore[operator]
            "p99_ms": None if not self.latencies else 1000 * percentile(self.latencies, 99),  # type: ignore[operator]
            "rss_mb_max": max(self.rss) / 2**20 if self.rss else None,
            "rss_anon_mb_max": max(self.rss_anon) / 2**20 if self.rss_anon else None,
            "rss_file_mb_max": max(self.rss_file) / 2**20 if self.rss_file else None,
            "checkpoints": self.delta("foveate_checkpoints_total"),
            "checkpoint_s_mean": self.mean("foveate_checkpoint_seconds"),
            "stall_ms_mean": self.stall_ms(),
            "queue_max": max(self.queue) if self.queue else None,
            "not_ready_share": self.not_ready / self.samples if self.samples else None,
            "sample_errors": dict(self.sample_errors),
            "server_ms_mean": self.server_ms(),
        }

    def delta(self, name: str) -> float | None:
        """How much a counter in ``gauges`` grew over this minute's samples."""
        values = [g[name] for g in self.gauges if name in g]
        return values[-1] - values[0] if len(values) >= 2 else None

    def mean(self, histogram: str) -> float | None:
        """A histogram's mean over the observations made in this minute (None: none made)."""
        count = self.delta(f"{histogram}_count")
        total = self.delta(f"{histogram}_sum")
        return None if not count or total is None else total / count

    def stall_ms(self) -> float | None:
        """Mean time learning paused for the checkpoints snapshotted in this minute, ms."""
        mean = self.mean("foveate_checkpoint_stall_seconds")
        return None if mean is None else 1000.0 * mean

    def server_ms(self) -> float | None:
        """Mean time the server took to answer a fixation request in this minute (its histogram):
        what the latency above holds beyond it was spent in the client or in the server's accept queue."""
        if len(self.server) < 2 or self.server[-1][1] <= self.server[0][1]:
            return None
        (s0, n0), (s1, n1) = self.server[0], self.server[-1]
        return 1000.0 * (s1 - s0) / (n1 - n0)


class Soak:
    """The load and its bookkeeping; ``minutes[k]`` collects fixations produced in minute ``k``."""

    def __init__(self, args: argparse.Namespace, url: str, pid: int, patches: list[np.ndarray]) -> None:
        self.args, self.url, self.pid, self.patches = args, url, pid, patches
        self.retries: Counter[str] = Counter()
        self.book: list[Minute] = []  # set by soak(); retries are counted in the minute they happen
        self.start = time.perf_counter()
        policy = sdk.RetryPolicy(
            max_retries=1000, max_retry_after=args.max_wait, max_total_wait=args.max_wait
        )
        # One client (one connection pool) per stream, as one per eye tracker: one shared pool of
        # thousands of connections cost the client most of a core and minutes of latency (a trial:
        # 64 fixations/s calibrated against 241/s with a pool a stream).
        self.clients = [
            sdk.AsyncFoveateClient(
                url,
                timeout=120.0,
                retry=policy,
                encoding="raw",
                transport=httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=args.window + 2)),
                on_retry=self.count_retry,
            )
            for _ in range(args.streams)
        ]
        self.seq = [0] * args.streams

    def count_retry(self, event: Any) -> None:
        reason = event.reason.split(":")[0]  # "HTTP 429 QueueFull", "ReadError" (not its message)
        self.retries[reason] += 1
        if self.book:
            minute = min(len(self.book) - 1, int((time.perf_counter() - self.start) // 60))
            self.book[minute].retries[reason] += 1

    def patch(self, stream: int) -> np.ndarray:
        return self.patches[(stream * 7919 + self.seq[stream]) % len(self.patches)]

    async def send(self, stream: int) -> tuple[str, str, float]:
        """One fixation of a stream: (outcome, its kind, seconds to the answer)."""
        seq = self.seq[stream]
        self.seq[stream] += 1
        start = time.perf_counter()
        fields = {"seq": seq} if self.args.seq else {}
        try:
            result = await self.clients[stream].post_fixation(f"soak-{stream}", self.patch(stream), **fields)
            # "already_applied": its seq arrived after a later one of its stream had been applied
            # (fixations of one stream in flight together can overtake each other): answered, not learned
            outcome = "ok" if result.status == "applied" else str(result.status)
            kind = "ok" if outcome == "ok" else "not_learned"
        except sdk.ClientError as exc:
            outcome, kind = type(exc).__name__, kind_of(exc)
        return outcome, kind, time.perf_counter() - start

    async def calibrate(self, seconds: float, warmup: float) -> float:
        """Answers per second with one fixation in flight per stream, after ``warmup`` seconds."""
        counted: list[float] = []
        end_warm = time.perf_counter() + warmup
        end = end_warm + seconds

        async def stream(i: int) -> None:
            while time.perf_counter() < end:
                outcome, _, _ = await self.send(i)
                if outcome == "ok" and time.perf_counter() > end_warm:
                    counted.append(time.perf_counter())
                elif outcome != "ok":
                    raise RuntimeError(f"calibration got {outcome}: the server is not healthy")

        await asyncio.gather(*(stream(i) for i in range(self.args.streams)))
        return len(counted) / seconds

    async def soak(self, rate: float, minutes: float) -> list[Minute]:
        """Every stream produces ``rate / streams`` fixations per second for ``minutes``."""
        args = self.args
        n_min = max(1, int(np.ceil(minutes)))
        book = [Minute() for _ in range(n_min)]
        book[-1].seconds = 60.0 * (minutes - (n_min - 1))
        start = time.perf_counter()
        self.book, self.start = book, start
        end = start + 60.0 * minutes
        interval = args.streams / rate
        rng = random.Random(16)
        tasks: set[asyncio.Task[None]] = set()

        async def one(i: int, minute: Minute, inflight: list[int]) -> None:
            outcome, kind, seconds = await self.send(i)
            inflight[i] -= 1
            minute.outcomes[outcome] += 1
            minute.kinds[kind] += 1
            if outcome == "ok":
                minute.latencies.append(seconds)

        async def stream(i: int, inflight: list[int]) -> None:
            next_at = start + rng.random() * interval
            while next_at < end:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                minute = book[min(n_min - 1, int((next_at - start) // 60))]
                minute.produced += 1
                if time.perf_counter() >= end:  # the client fell behind its clock: the run still ends
                    minute.unsent += 1
                elif inflight[i] >= args.window:
                    minute.shed += 1
                else:
                    inflight[i] += 1
                    task = asyncio.create_task(one(i, minute, inflight))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                next_at += interval

        async def sample() -> None:
            async with httpx.AsyncClient(base_url=self.url, timeout=30.0) as http:
                while time.perf_counter() < end:
                    minute = book[min(n_min - 1, int((time.perf_counter() - start) // 60))]
                    mem = proc_status(self.pid)
                    minute.rss.append(mem["VmRSS"])
                    minute.rss_anon.append(mem["RssAnon"])
                    minute.rss_file.append(mem["RssFile"] + mem["RssShmem"])
                    minute.samples += 1
                    try:
                        ready = await http.get("/readyz")
                        minute.not_ready += ready.status_code != 200
                        depth, route, gauges = await server_gauges(http)
                    except httpx.TransportError as exc:  # counted: an overloaded server may drop one
                        minute.sample_errors[type(exc).__name__] += 1
                        minute.not_ready += 1
                    else:
                        minute.queue.append(depth)
                        minute.server.append(route)
                        minute.gauges.append(gauges)
                    await asyncio.sleep(args.sample_s)

        inflight = [0] * args.streams
        await asyncio.gather(sample(), *(stream(i, inflight) for i in range(args.streams)))
        while tasks:  # the last fixations' answers (or their last retries)
            await asyncio.gather(*list(tasks))
        return book


#: ``/metrics`` samples kept per soak sample: the checkpoint writer's counters and histograms.
CHECKPOINT_SAMPLES = (
    "foveate_checkpoints_total",
    "foveate_checkpoint_seconds_sum",
    "foveate_checkpoint_seconds_count",
    "foveate_checkpoint_stall_seconds_sum",
    "foveate_checkpoint_stall_seconds_count",
    "foveate_checkpoint_bytes",
    "foveate_checkpoint_written_bytes",
)


async def server_gauges(http: httpx.AsyncClient) -> tuple[float, tuple[float, float], dict[str, float]]:
    """The worker's queue depth, (sum, count) of the fixation route's answer-time histogram, and the
    checkpoint samples (``CHECKPOINT_SAMPLES``, and the two histograms' buckets as ``name{le}``)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await http.get("/metrics")).text
    depth, total, count = float("nan"), 0.0, 0.0
    gauges: dict[str, float] = {}
    route = "/v1/streams/{stream_id}/fixations"
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "foveate_queue_depth":
                depth = float(s.value)
            elif s.name in CHECKPOINT_SAMPLES:
                gauges[s.name] = float(s.value)
            elif s.name.startswith("foveate_checkpoint") and s.name.endswith("_bucket"):
                gauges[f"{s.name}{{{s.labels['le']}}}"] = float(s.value)
            elif (
                s.name.startswith("foveate_http_request_duration_seconds") and s.labels.get("route") == route
            ):
                if s.name.endswith("_sum"):
                    total = float(s.value)
                elif s.name.endswith("_count"):
                    count = float(s.value)
    return depth, (total, count), gauges


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
        "stall_s_total": g.get("foveate_checkpoint_stall_seconds_sum"),
        "bytes_last": g.get("foveate_checkpoint_bytes"),
        "written_bytes_last": g.get("foveate_checkpoint_written_bytes"),
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


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from service.config import Settings

    env = {
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "FOVEATE_TORCH_THREADS": str(args.threads),
        "FOVEATE_CHECKPOINT_PATH": str(workdir / "checkpoints" / "foveate.pt")
        if args.checkpoint_interval_s > 0
        else "",
        "FOVEATE_CHECKPOINT_INTERVAL_S": str(args.checkpoint_interval_s or 300.0),
        "FOVEATE_LOG_LEVEL": "WARNING",
        # every fixation in flight holds a connection: uvicorn must not refuse them before the app can
        "FOVEATE_MAX_CONNECTIONS": str(args.streams * args.window + 64),
        **{f"FOVEATE_{k.upper()}": v for k, v in args.set.items()},
    }
    size = Settings(**args.set).input_size
    patches, dataset = load_patches(size)
    doc: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "dataset": dataset,
                           "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}  # fmt: skip
    with start_serve(workdir, env) as server:
        soak = Soak(args, server.url, server.pid, patches)
        busy0, cpu0, srv0 = machine_busy_seconds(), cpu_seconds(os.getpid()), server.cpu_seconds()
        rate = args.rate
        if rate is None:
            rate = await soak.calibrate(args.calibrate_s, warmup=5.0)
            print(
                f"sustainable: {rate:.1f} fixations/s ({args.streams} streams, one in flight each)",
                flush=True,
            )
        doc["sustainable_per_s"] = rate
        doc["offered_per_s"] = rate * args.overload
        t0 = time.perf_counter()
        book = await soak.soak(rate * args.overload, args.minutes)
        wall = time.perf_counter() - t0
        busy1, cpu1, srv1 = machine_busy_seconds(), cpu_seconds(os.getpid()), server.cpu_seconds()
        async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as http:
            doc["checkpoints"] = checkpoint_summary((await server_gauges(http))[2])
        doc["smaps_rollup_end"] = smaps_rollup(server.pid)
        for client in soak.clients:
            await client.aclose()
    doc["minutes"] = [m.summary(i) for i, m in enumerate(book)]
    doc["retries_by_reason"] = dict(soak.retries.most_common(10))
    doc["rss_mb_by_minute"] = {
        part: [m[f"{part}_mb_max"] for m in doc["minutes"]] for part in ("rss", "rss_anon", "rss_file")
    }
    peaks = [m["rss_mb_max"] for m in doc["minutes"] if m["rss_mb_max"] is not None]
    doc["rss_growth"] = peaks[-1] / peaks[0] - 1.0 if len(peaks) >= 2 else None
    latencies = [x for m in book for x in m.latencies]
    outcomes = sum((m.outcomes for m in book), Counter())
    kinds = sum((m.kinds for m in book), Counter())
    produced = sum(m.produced for m in book)
    doc["total"] = {
        "produced": produced,
        "answered": outcomes.get("ok", 0),
        "shed": sum(m.shed for m in book),
        "unsent": sum(m.unsent for m in book),
        "not_learned": kinds.get("not_learned", 0),
        "refused": kinds.get("refused", 0),
        "timed_out": kinds.get("timed_out", 0),
        "server_5xx": kinds.get("server_5xx", 0),
        "other_errors": kinds.get("other", 0),
        "outcomes": dict(outcomes),
        "not_ready_share": sum(m.not_ready for m in book) / max(1, sum(m.samples for m in book)),
        "queue_max": max((q for m in book for q in m.queue), default=None),
        "answered_per_s": outcomes.get("ok", 0) / wall,
        "p50_ms": None if not latencies else 1000 * percentile(latencies, 50),  # type: ignore[operator]
        "p99_ms": None if not latencies else 1000 * percentile(latencies, 99),  # type: ignore[operator]
    }
    if busy0 and busy1 and cpu0 is not None and cpu1 is not None and srv0 is not None and srv1 is not None:
        elapsed = busy1[1] - busy0[1]  # all cores' seconds
        cores = os.cpu_count() or 1
        doc["cpu"] = {"machine_busy_cores": (busy1[0] - busy0[0]) / elapsed * cores,
                      "server_cores": (srv1 - srv0) / (elapsed / cores),
                      "bench_cores": (cpu1 - cpu0) / (elapsed / cores)}  # fmt: skip
    doc["loadavg_end"] = os.getloadavg()
    return doc


COLUMNS = ("minute", "produced", "answered", "answered/s", "not learned", "refused", "timed out", "5xx",
           "shed", "unsent", "429 retries", "p50 ms", "p99 ms", "server mean ms", "RSS MB", "anon MB",
           "file MB", "queue max", "not ready", "ckpts", "stall ms")  # fmt: skip


def refusals(retries: dict[str, int]) -> int:
    """The SDK's retries after a 429 (any error name)."""
    return sum(v for k, v in retries.items() if k.startswith("HTTP 429"))


def _cell(value: Any, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def print_table(doc: dict[str, Any]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for m in doc["minutes"]:
        cells = [m["minute"], m["produced"], m["answered"], f"{m['answered_per_s']:.1f}", m["not_learned"],
                 m["refused"], m["timed_out"], m["server_5xx"], m["shed"], m["unsent"],
                 refusals(m["retries"]),
                 _cell(m["p50_ms"]), _cell(m["p99_ms"]), _cell(m.get("server_ms_mean")),
                 _cell(m["rss_mb_max"], "{:.1f}"), _cell(m["rss_anon_mb_max"], "{:.1f}"),
                 _cell(m["rss_file_mb_max"], "{:.1f}"),
                 _cell(m["queue_max"]), _cell(m["not_ready_share"], "{:.0%}"), _cell(m["checkpoints"]),
                 _cell(m["stall_ms_mean"], "{:.1f}")]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    growth = doc["rss_growth"]
    print(f"RSS growth (last minute's peak / first's): {'-' if growth is None else f'{100 * growth:+.2f} %'}")
    print(f"total: {json.dumps(doc['total'])}")
    print(f"retries: {json.dumps(doc['retries_by_reason'])}; cpu: {json.dumps(doc.get('cpu'))}")
    print(f"checkpoints: {json.dumps(doc.get('checkpoints'))}")
    print(f"smaps_rollup at the end (kB): {json.dumps(doc.get('smaps_rollup_end'))}")
    print(f"load average: start {doc['loadavg_start']}, end {doc['loadavg_end']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the soak")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--overload", type=float, default=2.0, help="offered rate over the sustainable rate")
    p.add_argument("--rate", type=float, help="the sustainable rate (fixations/s); measured when left out")
    p.add_argument("--calibrate-s", type=float, default=30.0, help="calibration window after 5 s warm-up")
    p.add_argument("--window", type=int, default=64, help="fixations in flight per stream at most")
    p.add_argument("--no-seq", dest="seq", action="store_false",
                   help="send without seq: every fixation is learned in the order it arrives, but the SDK "
                        "cannot resend one whose connection dropped")  # fmt: skip
    p.add_argument("--checkpoint-interval-s", type=float, default=60.0,
                   help="the server's checkpoint interval; 0: no checkpoints")  # fmt: skip
    p.add_argument("--max-wait", type=float, default=30.0, help="SDK: seconds of Retry-After waits in all")
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS, /readyz and queue sampling period")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="service Settings (FOVEATE_KEY)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--workdir", type=Path, help="server logs (default: a temporary folder)")
    args = p.parse_args(argv)
    pairs = [item.split("=", 1) for item in args.set]
    if any(len(pair) != 2 for pair in pairs):
        p.error("--set takes KEY=VALUE pairs")
    args.set = {k.lower(): v for k, v in pairs}
    if args.minutes <= 0 or args.streams < 1 or args.window < 1 or args.overload <= 0:
        p.error("--minutes, --overload must be > 0; --streams, --window >= 1")
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
