"""API keys on a real uvicorn (embedded worker): scopes, namespaces, the cross-key matrix, the key file.

Keys of the module's server (``keyed``):

- ``a``: namespace ``lab-a``, ingest + read;   ``a_read``: lab-a, read;   ``a_ingest``: lab-a, ingest
- ``b``: namespace ``lab-b``, ingest + read;   ``admin``: namespace ``ops``, admin

Every route is asked with the key that owns the stream, another namespace's key, no key, and a key
of the right namespace without the route's scope.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from learner.checkpoint import has_checkpoint
from service.auth import KeyStore, hash_token, new_key, read_keys_file, write_keys_file
from tests.service._support import REPO_ROOT, ThreadedServer, png, small_settings

PATCH = np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8)
BODY = {"patch_b64": base64.b64encode(png(PATCH)).decode()}


@dataclass
class Keyed:
    url: str
    keys: dict[str, str]  # name -> token
    keys_file: Path

    def client(self, who: str | None) -> httpx.Client:
        headers = {} if who is None else {"Authorization": f"Bearer {self.keys[who]}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60.0)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    from service.api.main import create_app

    tmp = tmp_path_factory.mktemp("keyed")
    spec = {
        "a": ("lab-a", {"ingest", "read"}),
        "a_read": ("lab-a", {"read"}),
        "a_ingest": ("lab-a", {"ingest"}),
        "b": ("lab-b", {"ingest", "read"}),
        "admin": ("ops", {"admin"}),
    }
    tokens, stored = {}, []
    for name, (namespace, scopes) in spec.items():
        tokens[name], key = new_key(namespace, scopes)
        stored.append(key)
    keys_file = tmp / "keys.txt"
    write_keys_file(keys_file, stored)
    settings = small_settings(keys_file=keys_file, checkpoint_path=tmp / "ckpt.pt", max_streams_per_key=3)
    server = ThreadedServer(create_app(settings)).start()
    keyed = Keyed(server.url, tokens, keys_file)
    with keyed.client("a") as a, keyed.client("b") as b:
        for client, stream in ((a, "rig1"), (a, "only-a"), (b, "rig1")):
            r = client.post(f"/v1/streams/{stream}/fixations", json=BODY)
            assert r.status_code == 200, r.text
    yield keyed
    server.stop()


def test_the_keys_file_holds_hashes_only(keyed: Keyed) -> None:
    text = keyed.keys_file.read_text()
    for token in keyed.keys.values():
        assert token not in text and hash_token(token) in text
    assert oct(keyed.keys_file.stat().st_mode & 0o777) == "0o600"


# route, method, path with {s} for a stream only lab-a has, the scope it needs, JSON body
ROUTES = [
    ("GET", "/v1/streams/{s}", "read", None),
    ("GET", "/v1/streams/{s}/prediction", "read", None),
    ("POST", "/v1/streams/{s}/reset", "ingest", {}),
    ("DELETE", "/v1/streams/{s}", "ingest", None),
]
WRONG_SCOPE = {"read": "a_ingest", "ingest": "a_read", "admin": "a"}


@pytest.mark.parametrize(("method", "path", "scope", "body"), ROUTES, ids=[f"{m} {p}" for m, p, *_ in ROUTES])
def test_stream_routes_cross_key_matrix(
    keyed: Keyed, method: str, path: str, scope: str, body: object
) -> None:
    def ask(who: str | None, stream: str = "only-a") -> httpx.Response:
        with keyed.client(who) as client:
            return client.request(method, path.format(s=stream), json=body)

    # no key, an unknown key, and a valid key without the scope: refused before anything else
    none = ask(None)
    assert none.status_code == 401 and none.json()["error"] == "Unauthorized"
    assert none.headers["www-authenticate"].startswith("Bearer")
    with httpx.Client(base_url=keyed.url, headers={"X-API-Key": "fov_00000000_" + "x" * 43}) as forged:
        assert forged.request(method, path.format(s="only-a"), json=body).status_code == 401
    wrong = ask(WRONG_SCOPE[scope])
    assert wrong.status_code == 403 and wrong.json()["error"] == "Forbidden"
    assert scope in wrong.json()["detail"]
    # another namespace: the stream does not exist for it (the same answer as a never-seen id)
    other = ask("b")
    assert other.status_code == 404 and other.json()["error"] == "UnknownStream"
    assert "lab-a" not in other.text
    # the owner, last (DELETE removes the stream)
    own = ask("a")
    assert own.status_code == 200, own.text
    if "stream_id" in own.json():
        assert own.json()["stream_id"] == "only-a"  # the caller's id, never the qualified one
    if method == "DELETE":
        with keyed.client("a") as a:
            assert a.post("/v1/streams/only-a/fixations", json=BODY).status_code == 200  # for later tests


def test_fixations_land_in_the_keys_own_namespace(keyed: Keyed) -> None:
    with keyed.client("a") as a, keyed.client("b") as b, keyed.client("a_read") as a_read:
        before_b = b.get("/v1/streams/rig1").json()["fixations"]
        r = a.post("/v1/streams/rig1/fixations", json=BODY)
        assert r.status_code == 200 and r.json()["stream_id"] == "rig1"
        assert b.get("/v1/streams/rig1").json()["fixations"] == before_b  # lab-b's rig1 is untouched
        assert a_read.post("/v1/streams/rig1/fixations", json=BODY).status_code == 403
        batch = {"fixations": [{"stream_id": "rig1", **BODY}]}
        assert a_read.post("/v1/fixations/batch", json=batch).status_code == 403
        out = b.post("/v1/fixations/batch", json=batch)
        assert out.status_code == 200 and out.json()["results"][0]["result"]["stream_id"] == "rig1"
        assert b.get("/v1/streams/rig1").json()["fixations"] == before_b + 1
    with httpx.Client(base_url=keyed.url) as anonymous:
        assert anonymous.post("/v1/streams/rig1/fixations", json=BODY).status_code == 401
        assert anonymous.post("/v1/fixations/batch", json=batch).status_code == 401


def test_listing_shows_only_the_namespace_and_all_needs_admin(keyed: Keyed) -> None:
    with keyed.client("a") as a, keyed.client("b") as b, keyed.client("admin") as admin:
        ids_a = {s["stream_id"] for s in a.get("/v1/streams").json()["streams"]}
        ids_b = {s["stream_id"] for s in b.get("/v1/streams").json()["streams"]}
        assert {"rig1", "only-a"} <= ids_a and ids_b == {"rig1"}
        assert a.get("/v1/streams", params={"all": "true"}).status_code == 403
        everything = {s["stream_id"] for s in admin.get("/v1/streams?all=true").json()["streams"]}
        assert {"lab-a:rig1", "lab-a:only-a", "lab-b:rig1"} <= everything
        assert admin.get("/v1/streams").json()["streams"] == []  # its own namespace holds nothing
    with keyed.client("a_ingest") as a_ingest, httpx.Client(base_url=keyed.url) as anonymous:
        assert a_ingest.get("/v1/streams").status_code == 403
        assert anonymous.get("/v1/streams").status_code == 401


def test_model_routes_and_admin_checkpoint(keyed: Keyed) -> None:
    with keyed.client("a_read") as reader, keyed.client("a_ingest") as writer:
        assert reader.get("/v1/model").status_code == 200
        assert writer.get("/v1/model").status_code == 403
    with httpx.Client(base_url=keyed.url) as anonymous:
        assert anonymous.get("/v1/model").status_code == 401
        assert anonymous.post("/v1/model/checkpoint", json={}).status_code == 401
        assert anonymous.get("/healthz").status_code == 200  # always open
        assert anonymous.get("/readyz").status_code == 200  # open unless FOVEATE_PROTECT_OPS
        assert anonymous.get("/metrics").status_code == 200
    with keyed.client("a") as a, keyed.client("admin") as admin:
        refused = a.post("/v1/model/checkpoint", json={})
        assert refused.status_code == 403 and "admin" in refused.json()["detail"]
        done = admin.post("/v1/model/checkpoint", json={})
        assert done.status_code == 200 and has_checkpoint(done.json()["path"])


def test_the_stream_quota_is_per_namespace(keyed: Keyed) -> None:
    # max_streams_per_key=3: lab-a holds rig1 and only-a, lab-b only rig1
    with keyed.client("a") as a, keyed.client("b") as b:
        assert a.post("/v1/streams/third/fixations", json=BODY).status_code == 200
        refused = a.post("/v1/streams/fourth/fixations", json=BODY)
        assert refused.status_code == 429 and refused.json()["error"] == "TooManyStreams"
        assert int(refused.headers["retry-after"]) >= 1
        assert "FOVEATE_MAX_STREAMS_PER_KEY" in refused.json()["detail"]
        assert b.post("/v1/streams/fourth/fixations", json=BODY).status_code == 200  # lab-b has room
        assert a.delete("/v1/streams/third").status_code == 200
        assert a.post("/v1/streams/fourth/fixations", json=BODY).status_code == 200  # room again
        assert a.delete("/v1/streams/fourth").status_code == 200


def test_a_revoked_key_stops_at_its_next_request(keyed: Keyed, tmp_path: Path) -> None:
    keys = read_keys_file(keyed.keys_file)
    token, extra = new_key("lab-a", {"read"})
    write_keys_file(keyed.keys_file, [*keys, extra])
    with httpx.Client(base_url=keyed.url, headers={"X-API-Key": token}) as client:
        assert client.get("/v1/streams").status_code == 200  # the file is re-read: a new key works at once
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "FOVEATE_KEYS_FILE": str(keyed.keys_file)}
        out = subprocess.run([sys.executable, "-m", "foveate", "keys", "revoke", extra.id],
                             env=env, capture_output=True, text=True, check=True)  # fmt: skip
        assert "revoked" in out.stdout
        assert client.get("/v1/streams").status_code == 401


def test_keys_cli_creates_lists_and_revokes(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "foveate", "keys", "--file", str(path), *args],
                              env=env, capture_output=True, text=True)  # fmt: skip

    made = run("create", "--namespace", "lab-a", "--scopes", "ingest,read")
    assert made.returncode == 0, made.stderr
    token = next(line.split()[1] for line in made.stdout.splitlines() if line.startswith("key:"))
    key = KeyStore([], path).lookup(token)
    assert key is not None and key.namespace == "lab-a" and key.scopes == {"ingest", "read"}
    assert token not in path.read_text()
    listed = run("list")
    assert key.id in listed.stdout and "lab-a" in listed.stdout and token not in listed.stdout
    bad = run("create", "--namespace", "lab a", "--scopes", "ingest")
    assert bad.returncode == 1 and "namespace" in bad.stderr
    bad = run("create", "--namespace", "lab-a", "--scopes", "root")
    assert bad.returncode == 1 and "scopes" in bad.stderr
    assert run("revoke", key.id).returncode == 0
    assert KeyStore([], path).lookup(token) is None
    assert run("revoke", key.id).returncode == 1  # already gone: says so
    env_line = run("create", "--namespace", "lab-b", "--env")
    stored = next(line.split()[1] for line in env_line.stdout.splitlines() if line.startswith("stored:"))
    env_token = next(line.split()[1] for line in env_line.stdout.splitlines() if line.startswith("key:"))
    store = KeyStore.from_settings(f"{stored}; ", None)
    assert store is not None and store.lookup(env_token) is not None


def test_rate_limit_and_protected_operations(redis_server: str) -> None:
    # The API alone (Redis mode, no worker): the key checks come before anything reaches the worker.
    import clients.sdk as sdk
    from service.api.main import create_app

    slow, slow_key = new_key("lab-a", {"read"})
    other, other_key = new_key("lab-b", {"read"})
    settings = small_settings(redis_url=redis_server, api_keys=f"{slow_key.line()};{other_key.line()}",
                              protect_ops=True, rate_limit_per_s=0.001, rate_limit_burst=2)  # fmt: skip
    server = ThreadedServer(create_app(settings)).start()
    try:
        with httpx.Client(base_url=server.url) as anonymous:
            assert anonymous.get("/healthz").status_code == 200
            assert anonymous.get("/metrics").status_code == 401
            assert anonymous.get("/readyz").status_code == 401
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {slow}"}) as client:
            assert [client.get("/metrics").status_code for _ in range(2)] == [200, 200]
            refused = client.get("/metrics")
            assert refused.status_code == 429 and refused.json()["error"] == "RateLimited"
            assert int(refused.headers["retry-after"]) >= 1 and "FOVEATE_RATE_LIMIT_PER_S" in refused.text
        with sdk.FoveateClient(server.url, api_key=slow, retry=sdk.NO_RETRY) as client:
            with pytest.raises(sdk.RateLimited):
                client.ready()
        with httpx.Client(base_url=server.url, headers={"X-API-Key": other}) as client:
            assert client.get("/metrics").status_code == 200  # each key has its own bucket
    finally:
        server.stop()


def test_serving_beyond_loopback_needs_keys_or_a_loud_flag(redis_server: str, tmp_path: Path) -> None:
    from tests.service._support import SMALL_ENV, ServiceProcess, free_port

    env = {**os.environ, **SMALL_ENV, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("FOVEATE_REDIS_URL", None)
    refused = subprocess.run([sys.executable, "-m", "foveate", "serve", "--host", "0.0.0.0", "--port", "9"],
                             env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 1
    assert "refusing to listen on 0.0.0.0 without API keys" in refused.stderr
    assert "--insecure-no-auth" in refused.stderr
    no_secret = subprocess.run([sys.executable, "-m", "foveate", "api", "--redis", redis_server],
                               env={**env, "FOVEATE_CONTROL_SECRET": ""}, capture_output=True, text=True,
                               timeout=120)  # fmt: skip
    assert no_secret.returncode == 1 and "FOVEATE_CONTROL_SECRET" in no_secret.stderr
    port = free_port()
    api = ServiceProcess(["api", "--redis", redis_server, "--host", "0.0.0.0", "--port", str(port),
                          "--insecure-no-auth"], {}, tmp_path / "api.log")  # fmt: skip
    try:
        api.wait_http(f"http://127.0.0.1:{port}/healthz")
        assert "INSECURE" in api.log.read_text() and "WITHOUT API KEYS" in api.log.read_text()
    finally:
        api.stop()


def first_snapshot(client: httpx.Client) -> dict:
    """The first ``snapshot`` event of the live page's event stream."""
    import json

    with client.stream("GET", "/ui/events", params={"interval": 0.25}) as r:
        assert r.status_code == 200, r.read()
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "snapshot":
                return json.loads(line[6:])
    raise AssertionError("no snapshot event")


def test_the_live_page_shows_each_key_its_own_namespace(keyed: Keyed) -> None:
    """/ui/events and /ui/streams/{id} need read and show only the key's streams, by its own ids."""
    with keyed.client("a") as a, keyed.client("b") as b, keyed.client("a_ingest") as a_ingest:
        ids_a = {s["stream_id"] for s in first_snapshot(a)["streams"]}
        ids_b = {s["stream_id"] for s in first_snapshot(b)["streams"]}
        assert {"rig1", "only-a"} <= ids_a and "only-a" not in ids_b and "rig1" in ids_b
        assert not any(":" in i for i in ids_a | ids_b)  # never another namespace's qualified ids
        assert a.get("/ui/streams/only-a").status_code == 200
        assert b.get("/ui/streams/only-a").status_code == 404  # lab-a's stream is not lab-b's to see
        assert a_ingest.get("/ui/events").status_code == 403
    with httpx.Client(base_url=keyed.url) as anonymous:
        assert anonymous.get("/ui/events").status_code == 401
        assert anonymous.get("/ui/streams/rig1").status_code == 401
        assert anonymous.get("/").status_code == 200  # the page itself is static; its data needs a key


def test_a_stream_id_naming_another_namespace_stays_in_the_keys_own(keyed: Keyed) -> None:
    """A lab-a key naming ``lab-b:rig1`` addresses ``lab-a:lab-b:rig1``, never lab-b's rig1."""
    with keyed.client("a") as a, keyed.client("b") as b:
        before = b.get("/v1/streams/rig1").json()["fixations"]
        assert a.get("/v1/streams/lab-b:rig1").status_code == 404
        assert a.post("/v1/streams/lab-b:rig1/reset", json={}).status_code in (200, 404)
        assert a.delete("/v1/streams/lab-b:rig1").status_code in (200, 404)
        r = a.post("/v1/streams/lab-b:rig1/fixations", json=BODY)
        assert r.status_code == 200 and r.json()["stream_id"] == "lab-b:rig1"
        after = b.get("/v1/streams/rig1").json()
        assert after["fixations"] == before  # lab-b's rig1 untouched by all of it
