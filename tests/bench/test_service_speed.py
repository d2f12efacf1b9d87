"""The service benchmark (issue 5): ``python -m bench.service_speed`` against real servers, briefly.

The slow tests run the documented command for about two seconds per mode, with 1 and 4 streams and
a small model, against a real ``foveate serve`` (HTTP, single and batch) and a real ``redis-server``
with ``foveate worker``, and check that every figure in the JSON is sane. The fast tests check the
pieces: the encoded requests are what the API and the worker parse, and the window arithmetic.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench._load import Payloads, Window
from bench.service_speed import measure, parse_args, summarise
from tests.conftest import REPO_ROOT, require_server_binary

SMALL = ["--set", "n_units=32", "embed_dim=16", "pred_hidden=32", "input_size=32"]
STREAMS = [1, 4]


def run_bench(tmp_path: Path, modes: list[str]) -> dict[str, Any]:
    """Run the benchmark's command line in a subprocess and return its JSON."""
    out = tmp_path / "service_speed.json"
    cmd = [sys.executable, "-m", "bench.service_speed", "--streams", *map(str, STREAMS), "--modes", *modes,
           "--seconds", "2", "--warmup", "0.5", "--rounds", "1", "--threads", "1", "--patches", "32",
           "--json", str(out), "--workdir", str(tmp_path / "servers"), *SMALL]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"bench failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "fix/s" in done.stdout  # the table was printed
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def check_runs(doc: dict[str, Any], modes: list[str]) -> None:
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["torch"]
    assert doc["config"]["model"]["input_size"] == 32
    seen = {(r["mode"], r["streams"]) for r in doc["runs"]}
    assert seen == {(m, n) for m in ["bare", *modes] for n in STREAMS}
    for r in doc["runs"]:
        what = f"{r['mode']} at {r['streams']} streams"
        assert r["fixations"] > 0 and r["fixations_per_s"] > 0, what
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p99"], what
        assert r["ratio_to_bare"] > 0 and math.isfinite(r["ratio_to_bare"]), what
        # one fixation per stream per tick: a tick holds between 1 and `streams` fixations
        assert 1 <= r["mean_batch"] <= r["streams"], what
        assert r["mean_tick_ms"] > 0, what
        assert all(v >= 0 for v in r["cpu_ms_per_fixation"].values()), what
        if r["mode"] != "bare":
            assert r["ticks"] > 0, what
            assert r["main_thread_cpu_ms_per_fixation"], what


@pytest.mark.slow
def test_http_modes_against_a_real_server(tmp_path: Path) -> None:
    modes = ["http", "http-batch"]
    check_runs(run_bench(tmp_path, modes), modes)


@pytest.mark.slow
def test_redis_mode_against_real_redis_and_worker(tmp_path: Path) -> None:
    require_server_binary("redis-server")
    doc = run_bench(tmp_path, ["redis"])
    check_runs(doc, ["redis"])
    assert {"worker", "redis"} <= set(doc["runs"][-1]["cpu_ms_per_fixation"])


def test_payloads_are_what_the_api_and_the_worker_parse() -> None:
    from service.api.schemas import FixationIn
    from service.messages import fixation_from_fields

    rng = np.random.default_rng(0)
    patches = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    pl = Payloads(patches)
    body = FixationIn.model_validate_json(pl.json_bodies[1])
    assert body.shape == (8, 8, 3)
    assert base64.b64decode(body.raw_b64 or "") == patches[1].tobytes()
    fix = fixation_from_fields({"stream_id": b"s0", "raw": pl.raw[2], "shape": pl.shape.encode()})
    assert fix.problem is None and fix.source is not None
    assert fix.source.shape == (8, 8, 3) and fix.source.data == patches[2].tobytes()
    # streams start at different patches and walk through all of them
    assert pl.index(0, 0) != pl.index(1, 0)
    assert sorted(pl.index(0, k) for k in range(3)) == [0, 1, 2]


def test_window_counts_only_answers_inside_it() -> None:
    w = Window(start=10.0, end=20.0)
    w.record(sent=9.0, done=9.5)  # answered during warm-up
    w.record(sent=9.0, done=10.5)  # sent before, answered inside: counts
    w.record(sent=19.0, done=21.0)  # answered after the end
    w.record(sent=12.0, done=12.25, count=4)  # a batch of four
    assert w.latencies == [1.5, 0.25, 0.25, 0.25, 0.25]
    snap = {"cpu": {"bench": 1.0}, "main_thread": {"serve": 0.5}, "machine": {"busy": 5.0}}
    later = {"cpu": {"bench": 2.0}, "main_thread": {"serve": 0.75}, "machine": {"busy": 8.0}}
    row = summarise([(w, snap, later)], streams=4)
    assert row["fixations"] == 5 and row["fixations_per_s"] == pytest.approx(0.5)
    assert row["latency_ms"]["p50"] == pytest.approx(250.0)
    assert row["cpu_ms_per_fixation"]["bench"] == pytest.approx(200.0)
    assert row["main_thread_cpu_ms_per_fixation"]["serve"] == pytest.approx(50.0)
    assert row["background_cores"] == pytest.approx((3.0 - 1.0) / 10.0)
    assert "mean_batch" not in row  # no /metrics read for this run


def test_bad_options_say_what_to_fix(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--set", "max_wiat_ms=5"])
    assert "Settings field" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--streams", "0"])
    assert parse_args(["--set", "max_wait_ms=20"]).set == {"max_wait_ms": "20"}


def test_measure_takes_both_snapshots_when_the_load_ends_first() -> None:
    """The load can end before ``measure`` wakes at the window's edge (its last answer came as the
    window closed, on a loaded machine): both snapshots are still taken. A load that ends at once
    makes that the case on any machine; one that fails raises its own error."""
    calls: list[Window] = []

    async def quick(window: Window) -> None:
        calls.append(window)

    window, first, last = asyncio.run(measure(quick, {"bench": os.getpid()}, None, 0.0, 0.05))
    assert calls == [window] and first["cpu"]["bench"] is not None and last["cpu"]["bench"] is not None

    async def broken(window: Window) -> None:
        raise ConnectionError("the server went away")

    with pytest.raises(ConnectionError, match="went away"):
        asyncio.run(measure(broken, {}, None, 0.0, 0.05))
