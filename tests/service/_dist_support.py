"""What the end-to-end tests of ``foveate worker --distributed`` share: ranks started as torchrun
starts them, waiting for their heartbeats, a command sent to one rank's control shard, and
:class:`Setup` (one redis-server, one checkpoint folder, APIs in front of any number of shards) with
:func:`group_setup`, the body of a module's fixture."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from service.messages import Control
from service.redis_broker import RedisBroker
from tests.service._support import ServiceProcess, ThreadedServer, free_port, small_settings

BOUND_S = 120  # a wait longer than this is a hang (the ranks' collective timeout: 20 s)


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


@dataclass
class Setup:
    """Redis, the checkpoint folder, and every process started (for the teardown)."""

    redis_url: str
    tmp: Path
    checkpoint: Path
    procs: list[ServiceProcess] = field(default_factory=list)
    apis: dict[int, tuple[ThreadedServer, httpx.Client]] = field(default_factory=dict)

    def ranks(self, world: int, tag: str, *, wait: bool = True) -> list[ServiceProcess]:
        """``world`` ranks of ``foveate worker --distributed`` with the variables torchrun sets."""
        ranks = start_ranks(world, self.redis_url, self.tmp, tag, checkpoint=self.checkpoint)
        self.procs.extend(ranks)
        if wait:
            wait_for_heartbeats(redis.Redis.from_url(self.redis_url), ranks, BOUND_S)
        return ranks

    def client(self, world: int) -> httpx.Client:
        """An API in front of ``world`` ranks (``FOVEATE_SHARDS=world``), started once."""
        from service.api.main import create_app

        if world not in self.apis:
            api = ThreadedServer(create_app(small_settings(redis_url=self.redis_url, shards=world))).start()
            self.apis[world] = (api, httpx.Client(base_url=api.url, timeout=60.0))
        return self.apis[world][1]

    def ask_rank(self, command: str, rank: int, world: int, **args: Any) -> dict[str, Any]:
        return ask_rank(self.redis_url, world, command, rank, **args)

    def fingerprints(self, world: int) -> list[str]:
        return [self.ask_rank("model", r, world)["model"]["distributed"]["fingerprint"] for r in range(world)]


def stop_group(ranks: list[ServiceProcess]) -> None:
    """SIGTERM to one rank stops the group: every rank checkpoints and exits 0."""
    ranks[-1].process.send_signal(signal.SIGTERM)
    for proc in ranks:
        assert proc.process.wait(timeout=BOUND_S) == 0, proc.tail()


def group_setup(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Setup]:
    """A module fixture's body: a real redis-server and a checkpoint folder; stops everything after."""
    from bench._servers import RedisServer
    from tests.conftest import require_server_binary

    tmp = tmp_path_factory.mktemp(name)
    redis_srv = RedisServer.start_in(tmp / "redis", binary=require_server_binary("redis-server"))
    s = Setup(redis_srv.url, tmp, tmp / "checkpoints" / "foveate.pt")
    try:
        yield s
    finally:
        for _, client in s.apis.values():
            client.close()
        for api, _ in s.apis.values():
            api.stop()
        for proc in s.procs:
            proc.stop(signal.SIGKILL, timeout=10)
        redis_srv.stop()
