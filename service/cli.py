"""``foveate serve | api | worker``: run the service (registered by ``foveate/cli.py``).

- ``serve``: the embedded default, API and worker in one process, no Redis; with ``--redis URL`` the
  same process talks to its worker over Redis (so rigs can XADD fixations too).
- ``api``: the stateless HTTP front end alone; needs ``--redis`` or ``FOVEATE_REDIS_URL``.
- ``worker``: the learning worker alone, over Redis; serves its metrics on
  ``--metrics-port`` (``FOVEATE_WORKER_METRICS_PORT``, default 9101); SIGTERM checkpoints and exits.

Options override the ``FOVEATE_*`` environment variables they name.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add ``serve``, ``api`` and ``worker`` to the ``foveate`` command line."""
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
    worker.add_argument("--metrics-host", help="address of the worker's /metrics (default 0.0.0.0)")
    worker.add_argument(
        "--metrics-port", type=int, help="port of the worker's /metrics (FOVEATE_WORKER_METRICS_PORT; 0: off)"
    )
    worker.set_defaults(func=_worker)


def _http_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (FOVEATE_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (FOVEATE_PORT, default 8000)")


def _settings(args: argparse.Namespace) -> Any:
    from service.config import Settings

    overrides: dict[str, Any] = {}
    names = {"host": "host", "port": "port", "redis": "redis_url",
             "metrics_host": "worker_metrics_host", "metrics_port": "worker_metrics_port"}  # fmt: skip
    for arg, field in names.items():
        value = getattr(args, arg, None)
        if value is not None:
            overrides[field] = value
    return Settings(**overrides)


def _need_redis(settings: Any, command: str) -> None:
    from service.errors import ConfigError

    if settings.redis_url is None:
        raise ConfigError(f"`foveate {command}` needs Redis: pass --redis URL or set FOVEATE_REDIS_URL "
                          "(or run `foveate serve` for the one-process mode)")  # fmt: skip


def _run_uvicorn(app: Any, settings: Any) -> None:
    import uvicorn

    # uvicorn turns SIGTERM into a graceful shutdown; the app's lifespan then checkpoints.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                access_log=False, timeout_graceful_shutdown=30)  # fmt: skip


def _serve(args: argparse.Namespace) -> int:
    from service.api.main import create_app
    from service.broker import make_broker
    from service.worker import Worker

    settings = _settings(args)
    broker = make_broker(settings)
    worker = Worker(settings, broker)
    _run_uvicorn(create_app(settings, broker, worker), settings)
    return 0


def _api(args: argparse.Namespace) -> int:
    from service.api.main import create_app

    settings = _settings(args)
    _need_redis(settings, "api")
    _run_uvicorn(create_app(settings), settings)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from service import metrics
    from service.redis_broker import RedisBroker
    from service.worker import Worker

    settings = _settings(args)
    _need_redis(settings, "worker")
    worker = Worker(settings, RedisBroker(settings))
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host,
                          registry=metrics.WORKER_REGISTRY)  # fmt: skip
        logger.info(
            "worker metrics on http://%s:%d/metrics",
            settings.worker_metrics_host,
            settings.worker_metrics_port,
        )

    def stop(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping after this tick", signum)
        worker.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.start(thread=False)
    try:
        worker.run()
    finally:
        worker.stop()  # final checkpoint
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
