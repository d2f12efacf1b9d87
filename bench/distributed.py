"""Scale-out: fixations per second of 1, 2, 4 gloo ranks sharing one model, and the collectives' share.

Every tick, every one of ``--streams`` streams sends a fixation; ``service.shards.rank_of`` gives each
stream to a rank, and each rank ticks its own (``learner.distributed``: one model kept identical by
the tick's collectives). Ranks are spawned processes on this machine, on 127.0.0.1, each with
``--threads`` intra-op threads. The learner runs on trunk features (``trunk='none'``, default
``--features`` 1752: what the default EfficientNet-Lite0 trunk gives), so the trunk, whose cost
splits perfectly across ranks, is left out: this measures the part that has to cooperate.

Printed per configuration (the median of ``--rounds`` interleaved runs, all in one invocation):
fixations/s (all ranks together, timed by the slowest rank), its ratio to one plain learner (no
``TickSync``), and the share of each rank's tick spent in collectives (waiting for slower ranks
included: the hash does not split a few streams evenly, so the rank with more rows sets the pace).
On a machine with fewer cores than ranks x threads the ranks time-share the cores and the scaling
shown is the machine's, not the method's; the script prints the core count and the load average
beside the figures.

    python -m bench.distributed --ranks 1 2 4 --streams 16 --threads 1 --json runs/bench/distributed.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from learner.config import ModelConfig
from learner.distributed import idle_tick, join
from learner.rfp import RFPLearner
from service.shards import rank_of


def _config(features: int) -> ModelConfig:
    return ModelConfig(trunk="none", in_features=features)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, world: int, port: int, args: dict[str, Any], out: Any) -> None:
    """One rank (``world`` 0: a plain learner, no process group): tick, time, report on ``out``."""
    torch.set_num_threads(args["threads"])
    learner = RFPLearner(_config(args["features"]))
    streams = [f"lab/p{i}" for i in range(args["streams"])]
    mine = [s for s in streams if world == 0 or rank_of(s, world) == rank]
    if world:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
        sync = join(learner)
    rng = np.random.default_rng(rank)
    total = args["warmup"] + args["ticks"]
    x = torch.from_numpy(rng.standard_normal((total, len(mine), args["features"]), dtype=np.float32))
    start = collective = 0.0
    for t in range(total):
        if t == args["warmup"]:
            if world:
                dist.barrier()
                collective = sync.collective_s
            start = time.perf_counter()
        if mine:
            learner.tick_features(mine, x[t])
        else:
            idle_tick(learner)
    wall = time.perf_counter() - start
    if world:
        collective = sync.collective_s - collective
        dist.destroy_process_group()
    out.put({"rank": rank, "rows": len(mine), "wall_s": wall, "collective_s": collective})


def run(world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Spawn ``world`` ranks (0: one plain learner) and gather their timings."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, out)) for r in range(max(world, 1))]
    for p in procs:
        p.start()
    ranks = sorted((out.get(timeout=1800) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a rank exited with {p.exitcode}")
    slowest = max(r["wall_s"] for r in ranks)
    return {
        "ranks": world,
        "fixations_per_s": args["streams"] * args["ticks"] / slowest,
        "rows_per_rank": [r["rows"] for r in ranks],
        "collective_share": [r["collective_s"] / r["wall_s"] for r in ranks],
        "tick_ms": 1e3 * slowest / args["ticks"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--streams", type=int, default=16, help="streams, each one fixation a tick")
    parser.add_argument("--features", type=int, default=1752)
    parser.add_argument("--ticks", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each configuration (median shown)")
    parser.add_argument("--json", type=Path, default=None)
    ns = parser.parse_args()
    args = {k: getattr(ns, k) for k in ("streams", "features", "ticks", "warmup", "threads")}
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; {args}")
    worlds = [0, *ns.ranks]
    rounds: dict[int, list[dict[str, Any]]] = {w: [] for w in worlds}
    for k in range(ns.rounds):  # interleaved, the order reversed every other round: noise hits all alike
        for world in worlds if k % 2 == 0 else worlds[::-1]:
            rounds[world].append(run(world, args))
    # per configuration, the round of median throughput
    rows = [sorted(rs, key=lambda r: r["fixations_per_s"])[len(rs) // 2] for rs in rounds.values()]
    base = rows[0]
    print(f"{'ranks':>10} {'fix/s':>9} {'x plain':>8} {'tick ms':>8}  rows per rank   collectives' share")
    for r in rows:
        name = "plain" if r["ranks"] == 0 else str(r["ranks"])
        share = " ".join(f"{s:4.0%}" for s in r["collective_share"])
        ratio = r["fixations_per_s"] / base["fixations_per_s"]
        print(
            f"{name:>10} {r['fixations_per_s']:9.1f} {ratio:8.2f} {r['tick_ms']:8.1f}  "
            f"{r['rows_per_rank']!s:15} {share}"
        )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps({"args": args, "cores": os.cpu_count(), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
