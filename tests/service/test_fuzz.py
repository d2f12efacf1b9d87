"""5,000 requests generated from the live OpenAPI schema (``bench/fuzz.py``): no 5xx, memory bounded.

The server is a real ``foveate serve`` with API keys (an admin and a read-only key); the cases mix
valid and invalid parameters, bodies, images (real, corrupt, and headers that claim 20000 x 20000),
content types and keys. Hypothesis runs derandomized, so every run sends the same requests; a 5xx
fails the test with the request Hypothesis shrank it to. ``python -m bench.fuzz --cases 50000``
runs a larger campaign.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fuzz import fuzz, peak_rss, start_fuzz_server

pytestmark = pytest.mark.slow  # one server process; about a minute of requests on 2 cores

CASES = 5000


def test_five_thousand_generated_requests_get_no_5xx(tmp_path: Path) -> None:
    proc, keys = start_fuzz_server(tmp_path)
    try:
        before = peak_rss(proc.process.pid)
        tally = fuzz(proc.url, keys, CASES)
        grown = peak_rss(proc.process.pid) - before
    finally:
        proc.stop()
    assert tally.cases >= CASES
    assert not [s for s in tally.statuses if s >= 500], tally.statuses
    # the campaign reached the routes' own checks, not only the key and content-type gates
    assert tally.statuses[200] > 0 and tally.statuses[422] > 0 and tally.statuses[404] > 0, tally.statuses
    assert grown < 200 * 2**20, f"the server's peak RSS grew by {grown / 2**20:.0f} MB"
