"""What each spawned rank of tests/learner/test_distributed.py runs (importable: spawn pickles by name).

A rank joins a gloo group on 127.0.0.1, builds the same tiny float64 learner as every other rank,
and plays a tick schedule that every rank derives from the same seed: in each tick it learns from
the fixations of the streams ``rank_of`` gives it, or takes an ``idle_tick``. It leaves its shared
state, the per-stream outputs it produced and any error in ``out/rank<r>.pt``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from learner.bptt import BPTTLearner
from learner.config import ModelConfig
from learner.distributed import fingerprint, idle_tick, join, shared_state
from learner.errors import DistributedError, RankLost
from learner.rfp import RFPLearner
from learner.streaming import StreamLearner
from service.shards import rank_of

SMALL = dict(trunk="none", in_features=10, n_units=12, embed_dim=6, pred_hidden=9, lr=1e-2, seed=3)
STREAMS = [f"lab/p{i}" for i in range(16)]  # 11 + 5 on 2 ranks, 7 + 3 + 6 on 3

Tick = list[tuple[str, np.ndarray, bool]]  # (stream id, features (M,), reset)


def schedule(ticks: int, world: int, seed: int = 0) -> list[Tick]:
    """The global ticks: each stream fires with probability 0.6, sometimes with a reset; every
    fifth tick one rank (in turn) gets no fixation at all (with one rank: nobody has one)."""
    rng = np.random.default_rng(seed)
    drift = rng.standard_normal((len(STREAMS), SMALL["in_features"]))  # a per-stream mean: something to learn
    out: list[Tick] = []
    for t in range(ticks):
        fire = [i for i in range(len(STREAMS)) if rng.random() < 0.6]
        idle = (t // 5) % world if t % 5 == 2 else -1
        allowed = [i for i in range(len(STREAMS)) if rank_of(STREAMS[i], world) != idle]
        fire = [i for i in fire if i in allowed] or allowed[:1]
        rng.shuffle(fire)
        tick = []
        for i in fire:
            x = drift[i] + 0.5 * rng.standard_normal(SMALL["in_features"])
            tick.append((STREAMS[i], x, bool(rng.random() < 0.05)))
        out.append(tick)
    return out


def in_rank_order(tick: Tick, world: int) -> Tick:
    """The tick as one learner sees the ranks' rows: rank 0's, then rank 1's, ... (stable within)."""
    return sorted(tick, key=lambda f: rank_of(f[0], world))


def new_learner(kind: str, seed_offset: int = 0, device: str = "cpu") -> StreamLearner:
    """The tiny float64 learner every rank and the single reference build: RFP, or BPTT(4)."""
    cfg = ModelConfig(**{**SMALL, "seed": SMALL["seed"] + seed_offset})
    if kind == "bptt":
        return BPTTLearner(cfg, device=device, dtype=torch.float64, window=4)
    return RFPLearner(cfg, device=device, dtype=torch.float64)


def on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it moved to the CPU (a CUDA rank's results, for the test)."""
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(on_cpu(v) for v in obj)
    return obj.cpu() if torch.is_tensor(obj) else obj


def play(learner: StreamLearner, ticks: list[Tick], rank: int | None, world: int) -> dict[str, list[float]]:
    """Feed the ticks (this rank's part, or all of them in rank order with ``rank=None``); return
    each stream's errors in order."""
    errors: dict[str, list[float]] = {}
    for tick in ticks:
        mine = (
            in_rank_order(tick, world) if rank is None else [f for f in tick if rank_of(f[0], world) == rank]
        )
        if not mine:
            if rank is not None:  # a rank takes part in every tick; one learner has no empty tick
                idle_tick(learner)
            continue
        ids = [f[0] for f in mine]
        x = torch.tensor(np.stack([f[1] for f in mine]), dtype=learner.dtype, device=learner.device)
        out = learner.tick_features(ids, x, reset=[f[2] for f in mine])
        for sid, e in zip(ids, out.error.tolist(), strict=True):
            errors.setdefault(sid, []).append(e)
    return errors


def rank_main(
    rank: int,
    world: int,
    port: int,
    out: str,
    ticks: int,
    role: str,
    timeout_s: float,
    kind: str = "rfp",
    device: str = "cpu",
) -> None:
    """One rank. ``role``: ``play`` (the whole schedule), ``exit`` / ``stall`` (rank world-1 leaves,
    or stops calling collectives, after half the schedule; the others go on), ``differ`` (rank
    world-1 starts from another seed, so ``join`` must refuse), ``skew`` (rank world-1's tick counter
    is off by 5, so its first tick must be refused). ``device="cuda"``: NCCL, rank r on GPU r."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result: dict[str, Any] = {"rank": rank}
    try:
        # a long rendezvous (spawned interpreters start at different times on a loaded machine), then
        # the group the learner uses, with the short collective timeout under test
        if device == "cuda":
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=300))
        group = dist.new_group(timeout=timedelta(seconds=timeout_s))
        learner = new_learner(kind, int(role == "differ" and rank == world - 1), device)
        try:
            join(learner, group)
        except DistributedError as e:
            result["refused"] = str(e)
            return
        plan = schedule(ticks, world)
        if role in ("exit", "stall") and rank == world - 1:
            play(learner, plan[: ticks // 2], rank, world)
            if role == "exit":
                os._exit(3)  # no clean-up: as a killed process
            time.sleep(3600)  # stalled: alive, its sockets open, no collective any more
        if role == "skew" and rank == world - 1:
            learner.sync.ticks += 5  # as a rank whose collectives went out of step
        try:
            result["errors"] = play(learner, plan, rank, world)
        except DistributedError as e:  # RankLost: a peer is gone; else the ranks disagree
            result["lost" if isinstance(e, RankLost) else "refused"] = str(e)
        result["shared"] = on_cpu(shared_state(learner))
        result["fingerprint"] = fingerprint(learner)
    except Exception:
        result["traceback"] = traceback.format_exc()
        raise
    finally:
        torch.save(result, Path(out) / f"rank{rank}.pt")
    # Leave without tearing gloo down: its destructors can abort the process ("terminate called without
    # an active exception") when a peer has already closed its sockets, which says nothing about what
    # is under test, and the result is on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(
    target: Callable[..., None],
    args_of: Callable[[int, int], tuple[Any, ...]],
    world: int,
    result_of: Callable[[int], Path],
    survivors: int | None = None,
    join_bound_s: float = 400,
) -> list[dict[str, Any]]:
    """Spawn ``world`` processes ``target(*args_of(rank, port))`` (one free port for the group), wait
    for the first ``survivors`` (all by default; a rank left running past ``join_bound_s`` is a hang),
    kill the rest, and return the survivors' result files (``result_of(rank)``), each checked to hold
    no traceback and its process to have exited 0."""
    from bench._servers import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=args_of(r, port)) for r in range(world)]
    for p in procs:
        p.start()
    alive = procs if survivors is None else procs[:survivors]
    try:
        for r, p in enumerate(alive):
            p.join(join_bound_s)
            assert p.exitcode is not None, f"rank {r} still running after {join_bound_s} s: a hang"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    results = []
    for r, p in enumerate(alive):
        path = result_of(r)
        assert path.exists(), f"rank {r} left no result (exit code {p.exitcode})"
        res = torch.load(path, weights_only=False)
        assert "traceback" not in res, f"rank {r} failed:\n{res['traceback']}"
        assert p.exitcode == 0
        results.append(res)
    return results
