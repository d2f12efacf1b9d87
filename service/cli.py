"""``foveate serve | api | worker``: run the service (registered by ``foveate/cli.py``).

- ``serve``: the embedded default, API and worker in one process, no Redis; with ``--redis URL`` the
  same process talks to its worker over Redis (so rigs can XADD fixations too).
- ``api``: the stateless HTTP front end alone; needs ``--redis`` or ``FOVEATE_REDIS_URL``.
- ``worker``: the learning worker alone, over Redis; serves its metrics on
  ``--metrics-port`` (``FOVEATE_WORKER_METRICS_PORT``, default 9101); SIGTERM checkpoints and exits.
  ``worker --distributed``: one rank of a group under torchrun (service/dist_launch.py, dist_worker.py).
- ``keys create | revoke | list``: the API keys of a keys file (service/auth.py).

Options override the ``FOVEATE_*`` environment variables they name.

Safe defaults: ``serve`` and ``api`` refuse to listen on an address other than loopback without API
keys (``--insecure-no-auth`` overrides, with a warning at start); ``api`` and ``worker`` refuse to
run without ``FOVEATE_CONTROL_SECRET``, which signs the commands they exchange over Redis
(``serve --redis`` makes one for itself when none is set).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add ``serve``, ``api``, ``worker`` and ``keys`` to the ``foveate`` command line."""
    serve = subparsers.add_parser(
        "serve", help="API and learning worker in one process (the default way to run)"
    )
    _http_options(serve)
    serve.add_argument(
        "--redis", metavar="URL", help="talk to the in-process worker over Redis (FOVEATE_REDIS_URL)"
    )
    serve.set_defaults(func=_serve)

    api = subparsers.add_parser("api", help="the HTTP API alone; the worker runs elsewhere, over Redis")
    _http_options(api)
    api.add_argument("--redis", metavar="URL", help="Redis URL (FOVEATE_REDIS_URL); required")
    api.set_defaults(func=_api)

    worker = subparsers.add_parser("worker", help="the learning worker alone, over Redis")
    worker.add_argument("--redis", metavar="URL", help="Redis URL (FOVEATE_REDIS_URL); required")
    worker.add_argument(
        "--metrics-host", help="address of the worker's /metrics (FOVEATE_WORKER_METRICS_HOST; 127.0.0.1)"
    )
    worker.add_argument(
        "--metrics-port", type=int, help="port of the worker's /metrics (FOVEATE_WORKER_METRICS_PORT; 0: off)"
    )
    worker.add_argument(
        "--distributed",
        action="store_true",
        help="one rank of a group that learns one model, each rank its shard of the streams; launch "
        "under torchrun: torchrun --nproc-per-node 2 -m foveate worker --distributed (the API needs "
        "FOVEATE_SHARDS = the number of ranks; docs/deploy.md)",
    )
    worker.set_defaults(func=_worker)

    keys = subparsers.add_parser(
        "keys",
        help="create, revoke and list API keys",
        description="Manage the API keys of a keys file (FOVEATE_KEYS_FILE, or --file). The file holds "
        "only hashes; a new key is printed once. A running server re-reads the file when it changes.",
    )
    keys.add_argument("--file", type=Path, help="the keys file (default $FOVEATE_KEYS_FILE)")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="make a key and print it (once)")
    create.add_argument(
        "--namespace",
        required=True,
        help="the lab or project whose streams the key sees (1-32 of A-Z a-z 0-9 _ -); keys of one "
        "namespace share its streams",
    )
    create.add_argument(
        "--scopes", default="ingest,read", help="comma-separated: ingest, read, admin (default ingest,read)"
    )
    create.add_argument(
        "--env", action="store_true", help="print the stored line for FOVEATE_API_KEYS, write no file"
    )
    create.set_defaults(func=_keys_create)
    revoke = actions.add_parser("revoke", help="remove a key by its id (the 8 hex digits after fov_)")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=_keys_revoke)
    listing = actions.add_parser("list", help="list the keys: id, namespace, scopes, created")
    listing.set_defaults(func=_keys_list)


def _http_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (FOVEATE_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (FOVEATE_PORT, default 8000)")
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="listen on a non-loopback address without API keys (FOVEATE_ALLOW_NO_AUTH): anyone who "
        "reaches the port may read, reset and delete every stream",
    )


def _settings(args: argparse.Namespace) -> Any:
    from service.config import Settings

    overrides: dict[str, Any] = {}
    names = {"host": "host", "port": "port", "redis": "redis_url",
             "metrics_host": "worker_metrics_host", "metrics_port": "worker_metrics_port"}  # fmt: skip
    for arg, field in names.items():
        value = getattr(args, arg, None)
        if value is not None:
            overrides[field] = value
    if getattr(args, "insecure_no_auth", False):
        overrides["allow_no_auth"] = True
    return Settings(**overrides)


def _check_auth(settings: Any) -> None:
    """Refuse to serve without keys beyond loopback, unless told to (and then say so loudly)."""
    from service.auth import KeyStore, is_loopback
    from service.errors import ConfigError

    store = KeyStore.from_settings(settings.api_keys, settings.keys_file)
    if store is not None:
        if not len(store):
            logger.warning("no API key in FOVEATE_API_KEYS or %s yet: every request will get 401 until "
                           "`foveate keys create` makes one", settings.keys_file)  # fmt: skip
        return
    if is_loopback(settings.host):
        logger.info("no API keys: open to every local client of %s (loopback only)", settings.host)
        return
    if not settings.allow_no_auth:
        raise ConfigError(
            f"refusing to listen on {settings.host} without API keys: anyone who reaches it could read, "
            "reset and delete every stream. Create keys (`foveate keys create --namespace LAB`, then set "
            "FOVEATE_KEYS_FILE), listen on 127.0.0.1, or pass --insecure-no-auth (FOVEATE_ALLOW_NO_AUTH=1) "
            "on a network you trust"
        )
    for _ in range(3):
        logger.warning("INSECURE: listening on %s WITHOUT API KEYS (--insecure-no-auth): anyone who reaches "
                       "this port can read, reset and delete every stream and write checkpoints",
                       settings.host)  # fmt: skip


def _check_control_secret(settings: Any, command: str) -> None:
    from service.errors import ConfigError

    if settings.control_secret is None:
        raise ConfigError(
            f"`foveate {command}` needs FOVEATE_CONTROL_SECRET, the same in the API and the worker: it signs "
            "the commands (reset, delete, checkpoint) they exchange over Redis, so that nobody else with "
            "access to Redis can send them. Make one with: openssl rand -hex 32"
        )


def _need_redis(settings: Any, command: str) -> None:
    from service.errors import ConfigError

    if settings.redis_url is None:
        raise ConfigError(f"`foveate {command}` needs Redis: pass --redis URL or set FOVEATE_REDIS_URL "
                          "(or run `foveate serve` for the one-process mode)")  # fmt: skip


def _run_uvicorn(app: Any, settings: Any) -> None:
    import uvicorn

    from service.api.server import uvicorn_config

    # uvicorn turns SIGTERM into a graceful shutdown; the app's lifespan then checkpoints.
    uvicorn.Server(uvicorn_config(app, settings, timeout_graceful_shutdown=30)).run()


def _serve(args: argparse.Namespace) -> int:
    import secrets

    from pydantic import SecretStr

    settings = _settings(args)
    _check_auth(settings)  # before torch is imported: a refusal should come at once

    from service.api.main import create_app
    from service.brokers import make_broker
    from service.worker import Worker

    if settings.redis_url is not None and settings.control_secret is None:
        # API and worker share this process: a secret of its own signs their commands.
        settings = settings.model_copy(update={"control_secret": SecretStr(secrets.token_hex(32))})
    broker = make_broker(settings)
    worker = Worker(settings, broker)
    _run_uvicorn(create_app(settings, broker, worker), settings)
    return 0


def _api(args: argparse.Namespace) -> int:
    from service.api.main import create_app

    settings = _settings(args)
    _need_redis(settings, "api")
    _check_control_secret(settings, "api")
    _check_auth(settings)
    _run_uvicorn(create_app(settings), settings)
    return 0


def _worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _need_redis(settings, "worker")
    _check_control_secret(settings, "worker")
    if getattr(args, "distributed", False):
        from service.dist_launch import run_rank

        return run_rank(settings, _serve_worker_metrics, _stop_on_signals)

    from service.redis_broker import RedisBroker
    from service.worker import Worker

    worker = Worker(settings, RedisBroker(settings))
    _serve_worker_metrics(settings)
    _stop_on_signals(worker)
    worker.start(thread=False)
    try:
        worker.run()
    finally:
        worker.stop()  # final checkpoint
    return 0


def _serve_worker_metrics(settings: Any) -> None:
    """The worker's ``/metrics`` on its own port (none when the port is 0)."""
    from prometheus_client import start_http_server

    from service import metrics

    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host,
                          registry=metrics.WORKER_REGISTRY)  # fmt: skip
        logger.info(
            "worker metrics on http://%s:%d/metrics",
            settings.worker_metrics_host,
            settings.worker_metrics_port,
        )


def _stop_on_signals(worker: Any) -> None:
    """SIGTERM and SIGINT stop the worker after its tick."""

    def stop(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping after this tick", signum)
        worker.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


# ---------------------------------------------------------------- foveate keys


def _keys_file(args: argparse.Namespace) -> Path:
    from service.config import Settings
    from service.errors import ConfigError

    path = args.file or Settings().keys_file
    if path is None:
        raise ConfigError("which keys file? pass --file PATH or set FOVEATE_KEYS_FILE")
    return Path(path)


def _keys_create(args: argparse.Namespace) -> int:
    from service.auth import new_key, read_keys_file, write_keys_file

    token, key = new_key(args.namespace, args.scopes)
    if args.env:
        print(f"key:    {token}")
        print(f"stored: {key.line()}   (add to FOVEATE_API_KEYS, separated by ';')")
    else:
        path = _keys_file(args)
        keys = read_keys_file(path) if path.exists() else []
        write_keys_file(path, [*keys, key])
        print(f"key:    {token}")
        print(f"id {key.id}, namespace {key.namespace}, scopes {','.join(sorted(key.scopes))}, in {path}")
    print("The key is shown only now: give it to its user (FOVEATE_API_KEY, or --api-key).", file=sys.stderr)
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from service.auth import read_keys_file, write_keys_file
    from service.errors import ConfigError

    path = _keys_file(args)
    keys = read_keys_file(path) if path.exists() else []
    kept = [key for key in keys if key.id != args.key_id]
    if len(kept) == len(keys):
        raise ConfigError(f"no key {args.key_id!r} in {path}; `foveate keys list` shows the ids")
    write_keys_file(path, kept)
    print(f"revoked {args.key_id}; running servers refuse it from their next request")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    import time

    from service.auth import read_keys_file

    path = _keys_file(args)
    keys = read_keys_file(path) if path.exists() else []
    print(f"{'id':8}  {'namespace':32}  {'scopes':18}  created")
    for key in keys:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(key.created)) if key.created else "-"
        print(f"{key.id:8}  {key.namespace:32}  {','.join(sorted(key.scopes)):18}  {created}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m service.cli COMMAND``: the same commands without the ``foveate`` entry point."""
    parser = argparse.ArgumentParser(prog="python -m service.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
