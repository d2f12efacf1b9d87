"""What the end-to-end tests of ``foveate worker --distributed`` share: ranks started as torchrun
starts them, waiting for their heartbeats, and a command sent to one rank's control shard."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
from prometheus_client.parser import text_string_to_metric_families

from service.messages import Control
from service.redis_broker import RedisBroker
from tests.service._support import ServiceProcess, free_port, small_settings


def start_ranks(
    world: int,
    redis_url: str,
    logs: Path,
    tag: str,
    checkpoint: Path | None = None,
    metrics_port: int = 0,
    extra_env: dict[str, str] | None = None,
) -> list[ServiceProcess]:
    """``world`` ranks of ``foveate worker --distributed`` with the variables torchrun sets (each a
    process of its own, so that a test can kill one without torchrun's agent stopping the others);
    checkpoints into ``checkpoint`` (only the command's and the stop's), or none; rank r serves its
    metrics on ``metrics_port + r`` (0: none); ``extra_env`` adds or overrides settings."""
    master_port = free_port()
    ranks = []
    for rank in range(world):
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(master_port),
            "FOVEATE_REDIS_URL": redis_url,
            "FOVEATE_CHECKPOINT_PATH": "" if checkpoint is None else str(checkpoint),
            "FOVEATE_CHECKPOINT_INTERVAL_S": "3600",
            "FOVEATE_WORKER_METRICS_PORT": str(metrics_port),
            "FOVEATE_TORCH_THREADS": "1",
            "FOVEATE_DIST_TIMEOUT_S": "20",
            **(extra_env or {}),
        }
        ranks.append(ServiceProcess(["worker", "--distributed"], env, logs / f"{tag}-rank{rank}.log"))
    return ranks


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive TCP ports on 127.0.0.1 that were free a moment ago (the
    ranks' metrics ports: rank r serves on base + r)."""
    for _ in range(100):
        base = free_port()
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


def metric_value(url: str, name: str) -> float | None:
    """The value of the unlabelled sample ``name`` in the text at ``url`` (a ``/metrics``), or None."""
    text = httpx.get(url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return None


def wait_for_heartbeats(r: redis.Redis, ranks: list[ServiceProcess], bound_s: float) -> None:
    """Until every rank's heartbeat is its own (a previous group's stays for a few seconds)."""
    deadline = time.monotonic() + bound_s
    for rank, proc in enumerate(ranks):
        while True:
            raw = r.get(f"foveate:worker:heartbeat:{rank}")
            if raw is not None and json.loads(raw)["consumer"].endswith(f"-{proc.process.pid}"):
                break
            assert proc.process.poll() is None, proc.tail()
            assert time.monotonic() < deadline, f"rank {rank} wrote no heartbeat:\n{proc.tail()}"
            time.sleep(0.1)


def ask_rank(redis_url: str, world: int, command: str, rank: int, **args: Any) -> dict[str, Any]:
    """A command sent to one rank's control shard, as the API sends them (signed); its reply."""

    async def ask() -> dict[str, Any]:
        broker = RedisBroker(small_settings(redis_url=redis_url, shards=world))
        try:
            return await broker.command_rank(Control(command, args), rank, timeout=60)
        finally:
            await broker.close_api()

    reply = asyncio.run(ask())
    assert reply["ok"], reply
    return reply


def patch(seed: int) -> np.ndarray:
    """A 32 x 32 RGB patch, the same for the same seed."""
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
