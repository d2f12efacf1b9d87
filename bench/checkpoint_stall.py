"""How long learning stalls for a checkpoint at N streams, and what an incremental checkpoint writes.

The default model on the CPU, trunk features fed directly (``tick_features``). A loop of ticks (B
streams each, drawn at random) stands for the worker's; a checkpoint is taken as the worker takes
it: the loop pauses for ``take_snapshot`` (the stall), then a thread writes the snapshot while the
loop goes on ticking (at niceness 10, as the worker's periodic checkpoints; ``--nice 0``: not
niced). Measured in one run:

* the stall (snapshot) against the 100 ms target, and against the single-file checkpoint of
  foveate before issue 16 (``torch.save`` of the whole ``state_dict()``, the loop waiting for all of
  it; ``--no-legacy`` skips it);
* the ticks during the write against ticks without one (copy-on-write costs a copy of each row a
  tick touches before the writer has read it, and the writer competes for the cores); the max
  includes, on whichever tick it falls, the running whitening's eigendecomposition (about 1-2 s
  at M = 1752 on one core, learner/model.py), which checkpoints do not cause;
* the process's resident memory (``VmRSS``, sampled every 10 ms by a thread) before the snapshot
  and its peak until the write ends: copy-on-write keeps the snapshot's view of every row that a
  tick changes before the writer has read it, so a full write while every stream keeps ticking
  can hold up to one more copy of the streams' state;
* the write's duration and bytes; then ``--rounds`` checkpoints, each after another 10 % of the
  streams changed, whose bytes should be about 10 % of the first's (plus the core file).

Run::

    python -m bench.checkpoint_stall --streams 1000 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from learner.checkpoint import take_snapshot, trunk_fingerprint, write_snapshot
from learner.config import ModelConfig
from learner.rfp import RFPLearner


def tick_times(learner: RFPLearner, ids: list[str], batch: int, gen: torch.Generator, until) -> list[float]:  # type: ignore[no-untyped-def]
    """Tick random batches of ``ids`` until ``until()`` is true; the seconds of each tick."""
    times: list[float] = []
    while not until(len(times)):
        pick = torch.randperm(len(ids), generator=gen)[:batch].tolist()
        t0 = time.perf_counter()
        learner.tick_features([ids[i] for i in pick], torch.randn(batch, learner.cfg.M, generator=gen))
        times.append(time.perf_counter() - t0)
    return times


def rss_bytes() -> int:
    """This process's resident set size (``VmRSS``), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class RssPeak:
    """A thread that samples this process's RSS every ``period`` s until stopped; ``peak`` is the most
    it saw (``VmHWM`` would hold the whole run's peak, start-up included, and cannot be reset)."""

    def __init__(self, period: float = 0.01) -> None:
        self.period, self.peak = period, rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return self.peak


def checkpoint(
    learner: RFPLearner, path: Path, ids: list[str], batch: int, gen: torch.Generator, nice: int = 0
) -> dict:  # type: ignore[type-arg]
    """One checkpoint as the worker takes it, the loop ticking during the write."""
    rss_before = rss_bytes()
    watch = RssPeak()
    t0 = time.perf_counter()
    snap = take_snapshot(path, learner, {"bench": True})
    stall = time.perf_counter() - t0
    out: dict = {}  # type: ignore[type-arg]

    def write() -> None:
        if nice:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)  # this thread only (Linux)
        out.update(write_snapshot(snap))

    writer = threading.Thread(target=write)
    writer.start()
    during = tick_times(learner, ids, batch, gen, lambda n: not writer.is_alive() and n >= 1)
    writer.join()
    peak = watch.stop()
    return {**out, "stall": stall, "ticks_during": during, "rss_before": rss_before, "rss_peak": peak,
            "streams_ticked": len(learner.states.dirty)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16, help="streams per tick of the loop")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--nice", type=int, default=10, help="the writer thread's niceness (the worker's: 10)")
    ap.add_argument("--rounds", type=int, default=3, help="incremental checkpoints after the full one")
    ap.add_argument("--no-legacy", action="store_true", help="skip the single-file checkpoint of before")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    learner = RFPLearner(ModelConfig())
    trunk_fingerprint(learner)  # computed once per learner, as the worker does at start
    ids = [f"s{i}" for i in range(args.streams)]
    for i in range(0, len(ids), 64):
        chunk = ids[i : i + 64]
        learner.tick_features(chunk, torch.randn(len(chunk), learner.cfg.M, generator=gen))
    print(f"{args.streams} streams, {learner.memory_per_stream() / 2**20:.2f} MB each, ticks of "
          f"{args.batch}, {args.threads} torch thread(s); load {os.getloadavg()[0]:.2f}")  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "ckpt"
        base = tick_times(learner, ids, args.batch, gen, lambda n: n >= 30)
        first = checkpoint(learner, path, ids, args.batch, gen, args.nice)
        rounds = []
        changed = ids[: max(1, len(ids) // 10)]
        for r in range(args.rounds):
            learner.states.dirty.clear()  # what the ticks during the last write touched: not counted
            changed = ids[r * len(ids) // 10 :][: max(1, len(ids) // 10)]
            for i in range(0, len(changed), args.batch):
                part = changed[i : i + args.batch]
                learner.tick_features(part, torch.randn(len(part), learner.cfg.M, generator=gen))
            rounds.append(checkpoint(learner, path, ids, args.batch, gen, args.nice))
        legacy = float("nan")
        if not args.no_legacy:  # last: its 1 GB of page cache would slow what follows
            t0 = time.perf_counter()
            with open(Path(tmp) / "legacy.pt", "wb") as f:
                torch.save({"state": learner.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())
            legacy = time.perf_counter() - t0
    tick = statistics.median(base)
    print(f"ticks without a checkpoint: median {tick * 1e3:.1f} ms, p90 {p90(base) * 1e3:.1f} ms, "
          f"max {max(base) * 1e3:.1f} ms")  # fmt: skip
    for name, c in [("full", first)] + [(f"after 10 % changed ({i + 1})", c) for i, c in enumerate(rounds)]:
        during = c["ticks_during"]
        print(f"checkpoint {name}: stall {c['stall'] * 1e3:.1f} ms ({c['stall'] / 0.1:.2f}x the 100 ms "
              f"target); write {c['write_seconds']:.2f} s beside the loop, {c['streams_written']} streams, "
              f"{c['bytes_written'] / 2**20:.0f} MB written of {c['bytes'] / 2**20:.0f} MB; {len(during)} "
              f"ticks during it: median {statistics.median(during) / tick:.2f}x, p90 "
              f"{p90(during) / p90(base):.2f}x, max {max(during) * 1e3:.0f} ms")  # fmt: skip
    state = args.streams * learner.memory_per_stream()
    extra = first["rss_peak"] - first["rss_before"]
    print(f"RSS during the full write (every stream ticking, {first['streams_ticked']} touched since the "
          f"snapshot): {first['rss_before'] / 2**20:.0f} MB before the snapshot, peak "
          f"{first['rss_peak'] / 2**20:.0f} MB: +{extra / 2**20:.0f} MB = {extra / state:.2f}x the streams' "
          f"state ({state / 2**20:.0f} MB)")  # fmt: skip
    stalls = [c["stall"] for c in rounds]
    if stalls:
        print(f"stall of the incremental checkpoints: median {statistics.median(stalls) * 1e3:.1f} ms, "
              f"max {max(stalls) * 1e3:.1f} ms")  # fmt: skip
    if not args.no_legacy:
        print(f"single-file checkpoint of before (the loop waits for all of it): {legacy:.2f} s = "
              f"{legacy / first['stall']:.0f}x the full checkpoint's stall")  # fmt: skip
    if not rounds:
        return
    ratio = statistics.median(c["bytes_written"] / first["bytes_written"] for c in rounds)
    print(f"bytes written, incremental / full: {ratio:.3f} (streams changed: {len(changed) / len(ids):.2f}; "
          f"the rest is the core file, weights and optimizer, written every time)")  # fmt: skip


def p90(times: list[float]) -> float:
    return sorted(times)[int(0.9 * (len(times) - 1))]


if __name__ == "__main__":
    main()
