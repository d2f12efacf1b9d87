#!/usr/bin/env python3
"""Container health probe for the foveate images (standard library only, so any base image runs it).

Two checks, one per image:

``healthcheck.py http://127.0.0.1:8000/healthz``
    The API: healthy when the URL answers 200 within the timeout.
``healthcheck.py http://127.0.0.1:9101/metrics --max-heartbeat-age 60``
    The worker: its metrics server answers 200 *and* ``foveate_worker_up`` is 1 *and* the worker
    loop's ``foveate_worker_heartbeat_timestamp_seconds`` is younger than the given age. A metrics
    server alone would stay up in a thread while the learning loop hangs; the heartbeat catches that.

Exit status 0 is healthy, 1 unhealthy (the reason goes to stdout, which Docker keeps in
``docker inspect``'s health log).
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

HEARTBEAT = "foveate_worker_heartbeat_timestamp_seconds"
WORKER_UP = "foveate_worker_up"


def fetch(url: str, timeout: float) -> str:
    """GET ``url``; return the body, or raise ``OSError`` when it does not answer 200."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        if response.status != 200:
            raise OSError(f"{url} answered HTTP {response.status}")
        body: bytes = response.read()
    return body.decode("utf-8", errors="replace")


def gauge_value(exposition: str, name: str) -> float | None:
    """The value of the unlabelled sample ``name`` in a Prometheus text exposition, or None."""
    for line in exposition.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == name:
            return float(parts[1])
    return None


def check(
    url: str, *, timeout: float, max_heartbeat_age: float | None, now: float | None = None
) -> str | None:
    """Return None when healthy, else the reason why not."""
    try:
        body = fetch(url, timeout)
    except (OSError, urllib.error.URLError) as exc:
        return f"{url} does not answer: {exc}"
    if max_heartbeat_age is None:
        return None
    up = gauge_value(body, WORKER_UP)
    if up != 1.0:
        return f"{WORKER_UP} is {up} at {url}, not 1: the worker loop is not running"
    beat = gauge_value(body, HEARTBEAT)
    if beat is None:
        return f"{url} has no {HEARTBEAT}: is this a foveate worker's /metrics?"
    age = (time.time() if now is None else now) - beat
    if age > max_heartbeat_age:
        return f"worker heartbeat is {age:.0f} s old (limit {max_heartbeat_age:g} s): the loop is stuck"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", help="/healthz of the API or /metrics of the worker")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for an answer")
    parser.add_argument(
        "--max-heartbeat-age", type=float, default=None, metavar="S",
        help="worker check: also require foveate_worker_up 1 and a heartbeat younger than S seconds",
    )  # fmt: skip
    args = parser.parse_args(argv)
    problem = check(args.url, timeout=args.timeout, max_heartbeat_age=args.max_heartbeat_age)
    if problem is not None:
        print(f"unhealthy: {problem}")
        return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
