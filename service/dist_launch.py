"""How one rank of ``foveate worker --distributed`` comes to be: torchrun's environment, the rank's
settings (its shard of every key, its metrics port), the process groups it joins, and the CLI's
entry that runs it (the rank's loop itself is service/dist_worker.py).

Launched by torchrun, one process per rank (docs/deploy.md, "Scale-out on torch.distributed")::

    torchrun --nproc-per-node 2 -m foveate worker --distributed
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from learner.errors import ConfigError, DistributedError
from learner.streaming import resolve_device
from service import metrics
from service.config import Settings
from service.shards import shard_key

logger = logging.getLogger(__name__)

#: The rendezvous may wait for slow starts (image pulls, imports); the learner's collectives may not.
_RENDEZVOUS_TIMEOUT = timedelta(minutes=10)
#: The exit status of a rank that lost its group: the orchestrator restarts the group.
EXIT_RANK_LOST = 3


class RankEnv(NamedTuple):
    """Where this process is in the group, as torchrun tells it."""

    rank: int
    world: int
    local_rank: int


def rank_env(environ: dict[str, str] | None = None) -> RankEnv:
    """``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (torchrun's variables); ``ConfigError`` naming the
    launch line when they are missing (``MASTER_ADDR``/``MASTER_PORT`` are read by torch itself)."""
    env = os.environ if environ is None else environ
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise ConfigError(
            f"`foveate worker --distributed` is one rank of a group and needs {', '.join(missing)} in "
            "its environment: launch it with torchrun, e.g. "
            "`torchrun --nproc-per-node 2 -m foveate worker --distributed`"
        )
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK") or rank)
    except ValueError as exc:
        raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {exc}") from exc
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not in 0..WORLD_SIZE-1={world - 1}")
    return RankEnv(rank, world, local)


def check_settings(settings: Settings, world: int) -> None:
    """Refuse what a distributed worker cannot do yet, before any process group is made."""
    if world == 1:
        raise ConfigError(
            "a distributed worker of WORLD_SIZE=1 would read the shard keys (foveate:fixations:0), which "
            "an API with FOVEATE_SHARDS=1 does not write: run the single worker, `foveate worker`, "
            "instead (it reads the same checkpoints), or launch at least 2 ranks"
        )
    if "shards" in settings.model_fields_set and settings.shards != world:
        raise ConfigError(
            f"FOVEATE_SHARDS={settings.shards} but the group has WORLD_SIZE={world} ranks: the API "
            "would write streams to shards that no rank reads; give the API and every rank the same "
            "number (or leave FOVEATE_SHARDS unset in the workers)"
        )


def rank_settings(settings: Settings, rank: int, world: int) -> Settings:
    """This rank's settings: its shard of the input, control, heartbeat and journal keys, and its metrics port
    (``FOVEATE_WORKER_METRICS_PORT + rank``, so that ranks on one machine do not collide)."""
    port = settings.worker_metrics_port
    return settings.model_copy(
        update={
            "input_stream": shard_key(settings.input_stream, rank),
            "control_stream": shard_key(settings.control_stream, rank),
            "heartbeat_key": shard_key(settings.heartbeat_key, rank),
            "journal_stream": shard_key(settings.journal_stream, rank),  # its streams' resets and deletes
            "worker_metrics_port": port + rank if port else 0,
            "shards": world,
        }
    )


def init_group(settings: Settings, env: RankEnv) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Join the process group (gloo, or NCCL on CUDA) and return the group the learner uses (the
    same ranks with the short collective timeout ``dist_timeout_s``) and the one its checkpoints
    use (the rendezvous's long timeout: a write or load waits for the slowest rank)."""
    device = resolve_device(settings.device)
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)  # one GPU per rank on a machine
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=env.rank, world_size=env.world, timeout=_RENDEZVOUS_TIMEOUT)
    group = dist.new_group(timeout=timedelta(seconds=settings.dist_timeout_s))
    # checkpoints' collectives wait for the slowest rank's write or load (thousands of streams, a
    # shared file system), and the write's run in the writer's thread beside the ticks': a group of
    # the same ranks with the rendezvous's long timeout carries them, apart from the ticks' group
    # gloo, also beside NCCL: the writer thread's collectives then never share a GPU communicator
    # with the ticks' (their data are pickled bookkeeping and a few integers, on the CPU anyway)
    slow = dist.new_group(timeout=_RENDEZVOUS_TIMEOUT, backend="gloo")
    if not isinstance(group, dist.ProcessGroup) or not isinstance(slow, dist.ProcessGroup):
        # torch's marker for "not a member": every rank is
        raise DistributedError(f"rank {env.rank} is not in the group it made of every rank")
    logger.info("rank %d of %d joined the %s group (collective timeout %g s)",
                env.rank, env.world, backend, settings.dist_timeout_s)  # fmt: skip
    return group, slow


def run_rank(settings: Settings, serve_metrics: Any, stop_on_signals: Any) -> int:
    """``foveate worker --distributed`` (service/cli.py): join the group and run this rank until the
    ranks agree to stop (returns 0), or until a rank is lost: then log the ``RankLost`` and leave
    at once with status ``EXIT_RANK_LOST`` (no teardown of a broken group: gloo's can abort).

    ``serve_metrics(settings)`` and ``stop_on_signals(worker)`` are the CLI's, shared with the
    single worker."""
    from service.dist_worker import DistWorker
    from service.redis_broker import RedisBroker

    env = rank_env()
    check_settings(settings, env.world)
    settings = rank_settings(settings, env.rank, env.world)
    group, slow = init_group(settings, env)
    worker = DistWorker(settings, RedisBroker(settings), group, checkpoint_group=slow)
    serve_metrics(settings)
    stop_on_signals(worker)
    try:
        worker.start()
        worker.run()
    except DistributedError as exc:
        logger.error("rank %d of %d: %s: %s; exiting with status %d so that the group restarts",
                     env.rank, env.world, type(exc).__name__, exc, EXIT_RANK_LOST)  # fmt: skip
        metrics.WORKER_UP.set(0)
        logging.shutdown()
        os._exit(EXIT_RANK_LOST)
    worker.stop(checkpoint=False)
    dist.destroy_process_group()
    logger.info("rank %d of %d stopped", env.rank, env.world)
    return 0


__all__ = [
    "EXIT_RANK_LOST",
    "RankEnv",
    "check_settings",
    "init_group",
    "rank_env",
    "rank_settings",
    "run_rank",
]
