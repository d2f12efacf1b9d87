"""The soak's load: eye-tracker rigs, each producing fixations on its own clock, spread over processes.

A rig (one stream) does what docs/api.md and docs/clients.md ask of a client:

- it **produces** fixations on a clock (evenly spaced, a random phase per stream), whatever the
  server does, into a bounded buffer (:class:`RigBuffer`); past ``buffer_cap`` the *oldest* waiting
  fixation is dropped and counted as shed (a rig that cannot send keeps its newest data);
- it keeps **one request in flight**: when the last answer is back, everything waiting in its
  buffer (at most ``batch_cap``, oldest first) goes as one ordered batch (``POST
  /v1/fixations/batch``, ``wait=true``, every item with its ``seq``) through the SDK, which retries
  429/503 after the server's ``Retry-After`` (within ``max_wait`` seconds) and resends a batch whose
  connection dropped (safe: every item has a ``seq``).

So a stream's fixations reach the worker in ``seq`` order (no ``late``), the client makes few
requests (one per stream per round trip), and an overload still reaches the server: the batches
grow until ``batch_cap``, the server's backlog grows with them, and its back-pressure (429 with
``Retry-After``, ``/readyz`` 503) answers it.

The streams are spread over ``--load-procs`` processes (each an asyncio loop), so that one
process's GIL does not cap the load; each process reports its CPU time and how late its producer
clock ran (the *lag*: how long after a fixation's due time its producer woke up). A lag of more
than a few ms means that process could not keep its clock.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import resource
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clients import sdk


@dataclass
class Pending:
    """A fixation produced and not yet sent: its ``seq`` and when it was due (``time.monotonic``)."""

    seq: int
    due: float


class RigBuffer:
    """A rig's fixations waiting to be sent, oldest first; full, it sheds the oldest.

    Examples
    --------
    >>> buf = RigBuffer(cap=2)
    >>> [buf.produce(Pending(s, 0.0)) for s in range(3)]
    [None, None, Pending(seq=0, due=0.0)]
    >>> [p.seq for p in buf.take(8)]
    [1, 2]
    """

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError(f"a rig's buffer holds at least one fixation, not {cap}")
        self.cap = cap
        self._waiting: deque[Pending] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def produce(self, item: Pending) -> Pending | None:
        """Add a new fixation; the oldest one waiting when the buffer was full (it is shed), else None."""
        self._waiting.append(item)
        return self._waiting.popleft() if len(self._waiting) > self.cap else None

    def take(self, most: int) -> list[Pending]:
        """The oldest ``most`` fixations waiting, in ``seq`` order: the next request's batch."""
        return [self._waiting.popleft() for _ in range(min(most, len(self._waiting)))]


def kind_of(exc: BaseException) -> str:
    """What became of a fixation the SDK gave up on: ``refused`` (429: the server's back-pressure,
    still refusing when ``max_wait`` ran out), ``timed_out`` (504: accepted, not answered within
    ``FOVEATE_SYNC_TIMEOUT_S``, or the client's own timeout), ``server_5xx`` (any other 5xx),
    ``other`` (transport, 4xx)."""
    if isinstance(exc, sdk.Overloaded):
        return "refused"
    if isinstance(exc, (sdk.WorkerTimeout, sdk.RequestTimeout)):
        return "timed_out"
    if isinstance(exc, sdk.ServerError) or getattr(exc, "status_code", 0) >= 500:
        return "server_5xx"
    return "other"


@dataclass
class LoadMinute:
    """What one load process saw of the fixations produced in one minute of the soak."""

    produced: int = 0
    shed: int = 0
    unsent: int = 0  # still in a rig's buffer when the clock ran out
    outcomes: Counter[str] = field(default_factory=Counter)  # "ok", a result status, or an error class
    kinds: Counter[str] = field(default_factory=Counter)  # ok / not_learned / refused / timed_out / ...
    retries: Counter[str] = field(default_factory=Counter)  # the SDK's retries in this minute, by reason
    latencies: list[float] = field(default_factory=list)  # due to answer, seconds, learned ones
    requests: int = 0  # batches sent (first attempts) in this minute
    batch_items: int = 0  # fixations in those batches
    lag: list[float] = field(default_factory=list)  # producer lag, seconds, one per fixation produced

    def merge(self, other: LoadMinute) -> None:
        """Add another process's minute to this one."""
        for name in ("produced", "shed", "unsent", "requests", "batch_items"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("outcomes", "kinds", "retries"):
            getattr(self, name).update(getattr(other, name))
        self.latencies.extend(other.latencies)
        self.lag.extend(other.lag)


@dataclass
class LoadSpec:
    """What one load process runs: its streams, their clock and the SDK's settings."""

    url: str
    streams: list[int]
    interval: float  # seconds between two fixations of a stream
    minutes: float
    batch_cap: int
    buffer_cap: int
    max_wait: float
    patches: list[np.ndarray]
    seed: int


@dataclass
class LoadReport:
    """A load process's result: its minutes, its CPU seconds and its wall time."""

    minutes: list[LoadMinute]
    cpu_s: float
    wall_s: float
    streams: int


class Rigs:
    """One process's rigs: a producer and a sender per stream (see the module docstring)."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.start = self.end = 0.0  # set by run()
        n_min = max(1, int(np.ceil(spec.minutes)))
        self.book = [LoadMinute() for _ in range(n_min)]
        policy = sdk.RetryPolicy(
            max_retries=1000, max_retry_after=spec.max_wait, max_total_wait=spec.max_wait
        )
        # made before the start: a client's set-up (its TLS context) costs ms of CPU, which at the
        # start would have put the producers' clocks seconds behind
        self.clients = {
            i: sdk.AsyncFoveateClient(spec.url, timeout=120.0, retry=policy, encoding="raw",
                                      on_retry=self.count_retry)
            for i in spec.streams
        }  # fmt: skip

    def minute(self, t: float) -> LoadMinute:
        return self.book[min(len(self.book) - 1, max(0, int((t - self.start) // 60)))]

    def count_retry(self, event: Any) -> None:
        self.minute(time.monotonic()).retries[event.reason.split(":")[0]] += 1

    def patch(self, stream: int, seq: int) -> np.ndarray:
        return self.spec.patches[(stream * 7919 + seq) % len(self.spec.patches)]

    async def produce(self, stream: int, buf: RigBuffer, wake: asyncio.Event, phase: float) -> None:
        """The rig's clock: a fixation every ``interval`` seconds into its buffer, until the end."""
        due, seq = self.start + phase, 0
        while due < self.end:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            minute = self.minute(due)
            minute.produced += 1
            minute.lag.append(time.monotonic() - due)
            shed = buf.produce(Pending(seq, due))
            if shed is not None:
                self.minute(shed.due).shed += 1
            wake.set()
            seq += 1
            due += self.spec.interval
        wake.set()

    async def send(self, stream: int, buf: RigBuffer, wake: asyncio.Event) -> None:
        """One request in flight: whatever waits goes as one batch when the last answer is back."""
        client = self.clients[stream]
        while True:
            if not buf:
                if time.monotonic() >= self.end:
                    return
                wake.clear()
                await wake.wait()
                continue
            if time.monotonic() >= self.end:
                for left in buf.take(len(buf)):
                    self.minute(left.due).unsent += 1
                return
            batch = buf.take(self.spec.batch_cap)
            self.minute(time.monotonic()).requests += 1
            self.minute(time.monotonic()).batch_items += len(batch)
            items = [sdk.FixationItem(f"soak-{stream}", patch=self.patch(stream, p.seq), seq=p.seq,
                                      reset=p.seq == 0) for p in batch]  # fmt: skip
            try:
                answers = await client.post_fixations(items)
            except sdk.ClientError as exc:
                for p in batch:
                    minute = self.minute(p.due)
                    minute.outcomes[type(exc).__name__] += 1
                    minute.kinds[kind_of(exc)] += 1
                continue
            now = time.monotonic()
            for p, answer in zip(batch, answers, strict=True):
                minute = self.minute(p.due)
                if answer.error is not None:
                    minute.outcomes[type(answer.error).__name__] += 1
                    minute.kinds[kind_of(answer.error)] += 1
                    continue
                status = answer.result.status if answer.result is not None else "accepted"
                learned = status == "applied"
                minute.outcomes["ok" if learned else str(status)] += 1
                minute.kinds["ok" if learned else "not_learned"] += 1
                if learned:
                    minute.latencies.append(now - p.due)

    async def run(self, start: float) -> None:
        """Produce and send from ``start`` (``time.monotonic``) for ``spec.minutes``, then drain."""
        self.start, self.end = start, start + 60.0 * self.spec.minutes
        rng = random.Random(self.spec.seed)
        tasks = []
        for i in self.spec.streams:
            buf, wake = RigBuffer(self.spec.buffer_cap), asyncio.Event()
            tasks.append(self.produce(i, buf, wake, rng.random() * self.spec.interval))
            tasks.append(self.send(i, buf, wake))
        try:
            await asyncio.gather(*tasks)
        finally:
            for client in self.clients.values():
                await client.aclose()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_process(spec: LoadSpec, ready: Any, go: Any, out: Any) -> None:
    """A load process's body: say ready, wait for the shared start time, run, send the report."""
    rigs = Rigs(spec)
    ready.put(spec.seed)
    start = float(go.get())
    cpu0, wall0 = _cpu_s(), time.monotonic()
    asyncio.run(rigs.run(start))
    out.put(LoadReport(rigs.book, _cpu_s() - cpu0, time.monotonic() - wall0, len(spec.streams)))


class LoadProcesses:
    """Start the load processes, release them together, collect their reports.

    ``start()`` returns once every process has imported and is waiting; ``go()`` gives them one
    start time (``time.monotonic`` is one clock for every process of the machine); ``reports()``
    blocks until all are done.
    """

    def __init__(self, specs: list[LoadSpec]) -> None:
        ctx = mp.get_context("spawn")  # a clean interpreter: no copy of the parent's event loop
        self._ready, self._out = ctx.Queue(), ctx.Queue()
        self._go = [ctx.Queue() for _ in specs]
        self._procs = [
            ctx.Process(target=load_process, args=(spec, self._ready, go, self._out), daemon=True)
            for spec, go in zip(specs, self._go, strict=True)
        ]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def start(self, timeout: float = 120.0) -> None:
        for proc in self._procs:
            proc.start()
        for _ in self._procs:
            self._ready.get(timeout=timeout)

    def go(self, start: float) -> None:
        for go in self._go:
            go.put(start)

    def reports(self, timeout: float) -> list[LoadReport]:
        reports = [self._out.get(timeout=timeout) for _ in self._procs]
        for proc in self._procs:
            proc.join(timeout=30.0)
        return reports

    def stop(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10.0)


def split_streams(streams: int, procs: int) -> list[list[int]]:
    """Streams dealt round-robin over ``procs`` processes (none empty).

    >>> split_streams(5, 2)
    [[0, 2, 4], [1, 3]]
    """
    procs = max(1, min(procs, streams))
    return [list(range(k, streams, procs)) for k in range(procs)]
