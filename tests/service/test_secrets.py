"""Secrets never leave, and the control stream obeys only the API: ``foveate api`` + ``foveate worker``
over a real ``redis-server`` with an ACL user and password, as the compose stack runs them.

Every answer (bodies and headers), both processes' logs and both ``/metrics`` pages are searched
for the Redis password, the API key, the control secret and any ``redis://`` URL, after normal
requests, refused ones, forged and replayed commands on the control stream, and Redis going down.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from bench._servers import LOOPBACK, free_port
from service.auth import new_key
from tests.conftest import require_server_binary
from tests.service._support import ServiceProcess, scrape

pytestmark = pytest.mark.slow  # two foveate processes

PASSWORD = "pw-Zq81xT4vLm"
CONTROL_SECRET = "ctl-Hh3k9Wq2"


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """redis-server with the default user off and one ACL user ``foveate``; yields (process, URL)."""
    binary = require_server_binary("redis-server")
    port = free_port()
    acl = ["--user", "default", "off", "--user", "foveate", "on", f">{PASSWORD}", "~foveate:*", "&*", "+@all",
           "-@dangerous"]  # fmt: skip
    args = [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path), *acl]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://foveate:{PASSWORD}@{LOOPBACK}:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with pytest.raises(redis.AuthenticationError):  # the default user is off: a password is required
        redis.Redis(host=LOOPBACK, port=port).ping()
    client.close()
    yield proc, url
    proc.kill()
    proc.wait()


def test_no_secret_leaves_and_forged_commands_are_dropped(
    acl_redis: tuple[subprocess.Popen[bytes], str], tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    redis_proc, url = acl_redis
    token, key = new_key("lab-a", {"ingest", "read"})
    api_port, metrics_port = free_port(), free_port()
    env = {"FOVEATE_REDIS_URL": url, "FOVEATE_API_KEYS": key.line(), "FOVEATE_CONTROL_SECRET": CONTROL_SECRET,
           "FOVEATE_LOG_LEVEL": "DEBUG"}  # fmt: skip
    worker = ServiceProcess(["worker", "--metrics-port", str(metrics_port)], env, tmp_path / "worker.log")
    api = ServiceProcess(["api", "--port", str(api_port)], env, tmp_path / "api.log")
    processes.extend([worker, api])
    base = f"http://{LOOPBACK}:{api_port}"
    api.wait_http(base + "/readyz")
    seen: list[str] = []

    def ask(method: str, path: str, who: str | None = token, **kwargs: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {who}"} if who else {}
        r = httpx.request(method, base + path, headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]
        seen.append(f"{r.status_code} {dict(r.headers)} {r.text}")
        return r

    patch = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    fixation = {"raw_b64": base64.b64encode(patch.tobytes()).decode(), "shape": [32, 32, 3]}
    assert ask("POST", "/v1/streams/rig1/fixations", json=fixation).status_code == 200
    assert ask("POST", "/v1/streams/rig1/reset", json={}).status_code == 200
    assert ask("GET", "/v1/streams").status_code == 200
    assert ask("GET", "/v1/model").status_code == 200
    assert ask("POST", "/v1/model/checkpoint", json={}).status_code == 403
    assert ask("GET", "/v1/streams", who=token[:-4] + "AAAA").status_code == 401
    assert ask("GET", "/v1/streams", who=None).status_code == 401
    assert ask("POST", "/v1/streams/rig1/fixations", json={"raw_b64": "AAAA"}).status_code == 422

    # Anyone with Redis access: a forged delete, and a replay of the API's own signed reset.
    attacker = redis.Redis.from_url(url)
    control = "foveate:control"
    (_, signed), *_ = attacker.xrevrange(control, count=1)
    assert b"sig" in signed
    attacker.xadd(control, {"command": "delete", "args": json.dumps({"stream_id": "lab-a:rig1"}),
                            "request_id": "forged-1"})  # fmt: skip
    attacker.xadd(control, {**signed, b"command": b"delete"})  # a signature does not cover another command
    attacker.xadd(control, signed)  # replayed as it was
    # The API's next command comes after them on the same stream: once it is answered, they were read.
    info = ask("GET", "/v1/streams/rig1")
    assert info.status_code == 200 and info.json()["stream_id"] == "rig1", (
        "a forged command deleted the stream"
    )
    assert attacker.llen("foveate:result:forged-1") == 0  # not even answered
    worker_metrics = scrape(f"http://{LOOPBACK}:{metrics_port}/metrics")
    assert worker_metrics[("foveate_rejected_messages_total", (("reason", "unsigned_command"),))] == 3
    attacker.close()

    # Redis goes away: every route and /readyz say so, without saying where or with what password.
    redis_proc.kill()
    redis_proc.wait()
    for method, path in (("GET", "/readyz"), ("GET", "/v1/streams"), ("POST", "/v1/streams/rig1/fixations")):
        r = ask(method, path, json=fixation if method == "POST" else None)
        assert r.status_code == 503, r.text
        assert "FOVEATE_REDIS_URL" in r.json()["detail"]
    time.sleep(1.5)  # the worker's intake loop logs its Redis errors (rate-limited): let it try once
    pages = [httpx.get(base + "/metrics").text, httpx.get(f"http://{LOOPBACK}:{metrics_port}/metrics").text]
    api.stop()
    worker.stop()
    logs = [api.log.read_text(errors="replace"), worker.log.read_text(errors="replace")]
    assert "Redis at 127.0.0.1" in logs[1] or "Redis at 127.0.0.1" in logs[0], logs[1][-2000:]
    secret_part = token.split("_", 2)[2]
    for where, text in [("answers", "\n".join(seen)), ("api log", logs[0]), ("worker log", logs[1]),
                        ("api metrics", pages[0]), ("worker metrics", pages[1])]:  # fmt: skip
        for secret in (PASSWORD, secret_part, CONTROL_SECRET, "redis://"):
            assert secret not in text, f"{secret!r} appears in the {where}"
