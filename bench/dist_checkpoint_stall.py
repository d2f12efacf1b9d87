"""How long a group checkpoint stalls learning on 2 gloo ranks: the snapshot in the loop, against the
write beside it, and against the whole write in the loop (foveate before issue 15).

Two spawned ranks on 127.0.0.1, the default model on the CPU, trunk features fed directly
(``tick_features``), ``--streams`` streams split between the ranks by ``service.shards.rank_of``, as
``foveate worker --distributed`` holds them. The ranks tick in lockstep (each ``--batch`` of its
streams a tick, drawn at random) and checkpoint as the distributed worker does
(service/dist_checkpointer.py): every rank takes its part in the loop (``take`` on a second process
group: the generation, the snapshot, rank 0's gather; the stall), then a thread writes it and runs
the collective commit (``write``) while the loop ticks on, on the learner's group, one agreement a
tick saying whether any rank still writes (as the worker's fourth flag). Measured in one run:

* ``in the loop``: one full checkpoint as before issue 15 (``save``: the loop waits for the whole
  write);
* ``full``: one full checkpoint snapshot-then-write, into another folder (so every stream is
  written again);
* ``incremental``: ``--rounds`` more, each writing the streams ticked since the previous snapshot
  (during its write, and about 10 % more after it).

The writer thread runs at niceness ``--nice`` (10: the worker's periodic checkpoints; a checkpoint
command's write is not niced).

Per checkpoint: the stall (the slower rank's), the write (the slower rank's), their ratio, the
stall against the in-the-loop checkpoint's, the ticks taken during the write and their median time
against ticks without a write. The load average is printed beside the figures (two ranks on a
machine with few cores time-share them with the writer threads).

    python -m bench.dist_checkpoint_stall --streams 300 --threads 1
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from learner.checkpoint import trunk_fingerprint
from learner.config import ModelConfig
from learner.dist_checkpoint import save, take, write
from learner.distributed import idle_tick, join
from learner.rfp import RFPLearner
from service.shards import rank_of

WORLD = 2


def _tick(learner: RFPLearner, mine: list[str], batch: int, gen: torch.Generator) -> float:
    """One lockstep tick on ``batch`` of this rank's streams (idle with none); its seconds."""
    t0 = time.perf_counter()
    if mine:
        pick = torch.randperm(len(mine), generator=gen)[:batch].tolist()
        learner.tick_features([mine[i] for i in pick], torch.randn(len(pick), learner.cfg.M, generator=gen))
    else:
        idle_tick(learner)
    return time.perf_counter() - t0


def _any(flag: bool, group: dist.ProcessGroup) -> bool:
    """The worker's agreement, reduced to one flag: true on every rank if true on any."""
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _beside(learner: RFPLearner, path: Path, mine: list[str], args: dict[str, Any], gen: torch.Generator,
            group: dist.ProcessGroup, slow: dist.ProcessGroup) -> dict[str, Any]:  # fmt: skip
    """One checkpoint snapshot-then-write, the loop ticking in lockstep until no rank writes."""
    dist.barrier(group=group)
    t0 = time.perf_counter()
    part = take(path, learner, {"bench": True}, group=slow)
    stall = time.perf_counter() - t0
    out: dict[str, Any] = {}

    def run() -> None:
        if args["nice"]:  # this thread only (Linux), as the worker's periodic checkpoints
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), args["nice"])
        out.update(write(part))

    writer = threading.Thread(target=run)
    writer.start()
    during: list[float] = []
    while _any(writer.is_alive(), group):
        during.append(_tick(learner, mine, args["batch"], gen))
    writer.join()
    return {"stall": stall, "write": out["write_seconds"], "ticks": during,
            "written": out["streams_written"], "mb": out["bytes_written"] / 2**20}  # fmt: skip


def _rank(rank: int, port: int, args: dict[str, Any], results: Any) -> None:
    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=600))
    group = dist.new_group(timeout=timedelta(seconds=120))
    slow = dist.new_group(timeout=timedelta(seconds=600))
    learner = RFPLearner(ModelConfig())
    trunk_fingerprint(learner)  # once per learner, as the worker does at start
    join(learner, group)
    gen = torch.Generator().manual_seed(1 + rank)
    every = [f"s{i}" for i in range(args["streams"])]
    mine = [s for s in every if rank_of(s, WORLD) == rank]
    chunks = max(-(-sum(rank_of(s, WORLD) == r for s in every) // 64) for r in range(WORLD))
    for c in range(chunks):  # every stream once, in lockstep
        part = mine[64 * c : 64 * (c + 1)]
        if part:
            learner.tick_features(part, torch.randn(len(part), learner.cfg.M, generator=gen))
        else:
            idle_tick(learner)
    base = [_tick(learner, mine, args["batch"], gen) for _ in range(args["base_ticks"])]
    root = Path(args["dir"])
    dist.barrier(group=group)
    t0 = time.perf_counter()
    old = save(root / "in-loop", learner, {"bench": True}, group=slow)
    in_loop = time.perf_counter() - t0
    rows = [("full", _beside(learner, root / "beside", mine, args, gen, group, slow))]
    per_round = max(1, len(mine) // 10 // args["batch"])  # about 10 % of the streams tick
    for k in range(args["rounds"]):
        for _ in range(per_round):
            _tick(learner, mine, args["batch"], gen)
        rows.append((f"incremental {k + 1}", _beside(learner, root / "beside", mine, args, gen, group, slow)))
    results.put({"rank": rank, "streams": len(mine), "base": base, "in_loop": in_loop,
                 "in_loop_written": old["streams_written"], "rows": rows})  # fmt: skip
    dist.barrier(group=group)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=300, help="streams of the group (split by rank_of)")
    ap.add_argument("--batch", type=int, default=16, help="streams per tick on each rank")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--rounds", type=int, default=2, help="incremental checkpoints after the full one")
    ap.add_argument("--base-ticks", type=int, default=20, help="ticks timed without a checkpoint")
    ap.add_argument("--nice", type=int, default=10, help="the writer thread's niceness (periodic: 10)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ns = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        args = {"streams": ns.streams, "batch": ns.batch, "threads": ns.threads, "rounds": ns.rounds,
                "nice": ns.nice, "base_ticks": ns.base_ticks, "dir": ns.dir or tmp}  # fmt: skip
        load = os.getloadavg()[0]
        print(f"{WORLD} gloo ranks, {ns.streams} streams, ticks of {ns.batch} per rank, {ns.threads} "
              f"torch thread(s) per rank, {os.cpu_count()} cores; load {load:.2f} at start")  # fmt: skip
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        from bench._servers import free_port

        port = free_port()
        procs = [ctx.Process(target=_rank, args=(r, port, args, results)) for r in range(WORLD)]
        for p in procs:
            p.start()
        ranks = sorted((results.get(timeout=1800) for _ in procs), key=lambda r: r["rank"])
        for p in procs:
            p.join()
    base = statistics.median(t for r in ranks for t in r["base"])
    in_loop = max(r["in_loop"] for r in ranks)
    print(f"streams per rank {[r['streams'] for r in ranks]}; a tick without a checkpoint: median "
          f"{base * 1e3:.1f} ms")  # fmt: skip
    written = sum(r["in_loop_written"] for r in ranks)
    print(f"in the loop (before issue 15): full checkpoint of {written} streams, learning stalled "
          f"{in_loop * 1e3:.0f} ms")  # fmt: skip
    print(f"{'checkpoint':>14} {'stall ms':>9} {'write ms':>9} {'stall/write':>11} {'stall/in-loop':>13} "
          f"{'streams':>8} {'MB':>6} {'ticks during':>12} {'tick ms':>8} {'x without':>9}")  # fmt: skip
    for i, (name, _) in enumerate(ranks[0]["rows"]):
        rows = [r["rows"][i][1] for r in ranks]
        stall, wrote = max(c["stall"] for c in rows), max(c["write"] for c in rows)
        ticks = [t for c in rows for t in c["ticks"]]
        tick = statistics.median(ticks) if ticks else float("nan")
        print(f"{name:>14} {stall * 1e3:9.1f} {wrote * 1e3:9.0f} {stall / wrote:11.3f} "
              f"{stall / in_loop:13.3f} {sum(c['written'] for c in rows):8d} "
              f"{sum(c['mb'] for c in rows):6.0f} {len(rows[0]['ticks']):12d} {tick * 1e3:8.1f} "
              f"{tick / base:9.2f}")  # fmt: skip
    print(f"load {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
