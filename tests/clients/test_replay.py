"""``foveate replay`` and ``foveate demo`` end to end: recorded sessions into a real server.

The JSON lines are checked against the contract in docs/clients.md.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from clients import sdk
from clients.plots import ERROR_BY_STEP_PNG, ERROR_VS_FIXATIONS_PNG, plot_replay, running_mean
from clients.recorded import RecordedDataset, bundled_dataset_path
from clients.replay import ReplayOptions, ReplayRecord, replay, summarize
from foveate.cli import main
from learner.errors import PatchError
from learner.patches import cut_patch
from tests.clients._servers import SMALL_ENV, FoveateProcess, free_port, start_server, subprocess_env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FoveateProcess]:
    proc = start_server(tmp_path_factory.mktemp("serve"))
    yield proc
    proc.stop()


@pytest.fixture(params=["bundled", "shared"])
def dataset_dir(request: pytest.FixtureRequest) -> Path:
    if request.param == "shared":
        path: Path = request.getfixturevalue("shared_osie")
        return path
    return bundled_dataset_path()


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_sessions(
    ds: RecordedDataset, subjects: list[str], images: int, side: int
) -> dict[str, list[Any]]:
    """Per subject, the (image, fix_index) pairs that can be cut, in session order."""
    out: dict[str, list[Any]] = {}
    for s in subjects:
        keep = []
        for fix, _ in ds.session(s, images):
            try:
                cut_patch(ds.load_image(fix.image), fix.x, fix.y, side)
            except PatchError:
                continue
            keep.append((fix.image, fix.fix_index))
        out[s] = keep
    return out


def check_lines(lines: list[dict[str, Any]], expected: dict[str, list[Any]], prefix: str = "") -> None:
    """The JSON-lines contract of docs/clients.md."""
    assert len(lines) == sum(len(v) for v in expected.values())  # one line per fixation sent
    by_stream: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        assert set(line) >= {"stream", "subject", "image", "fix_index", "step", "error"}
        by_stream[line["stream"]].append(line)
    assert set(by_stream) == {f"{prefix}subject-{s}" for s in expected}
    for subject, pairs in expected.items():
        rows = by_stream[f"{prefix}subject-{subject}"]
        assert all(r["subject"] == subject for r in rows)
        assert [(r["image"], r["fix_index"]) for r in rows] == pairs  # session order kept
        assert [r["seq"] for r in rows] == list(range(len(rows)))
        previous: dict[str, Any] = {"image": None, "step": 0}
        for r in rows:
            new_image = r["image"] != previous["image"]
            assert r["reset"] == new_image
            assert (r["step"] == 1) == new_image  # steps restart at 1 after each reset
            assert (r["error"] is None) == (r["step"] == 1)  # null exactly where nothing was predicted
            assert (r["repeat_error"] is None) == (r["error"] is None)  # the baseline on the same fixations
            assert isinstance(r["skipped"], bool) and not (r["skipped"] and r["error"] is None)
            if not new_image:
                assert r["step"] == previous["step"] + 1
                assert r["error"] >= 0 and r["repeat_error"] >= 0
            previous = r


def test_replay_cli_against_a_server(
    server: FoveateProcess, dataset_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    out, plots = tmp_path / "out.jsonl", tmp_path / "plots"
    argv = ["replay", str(dataset_dir), "--server", server.url, "--subjects", "1,2,3", "--images", "3",
            "--out", str(out), "--plot", str(plots), "--stream-prefix", f"{dataset_dir.name}-",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    ds = RecordedDataset.open(dataset_dir)
    expected = expected_sessions(ds, ["1", "2", "3"], 3, 50)
    lines = read_lines(out)
    check_lines(lines, expected, prefix=f"{dataset_dir.name}-")
    # The server saw exactly what the lines say.
    with sdk.FoveateClient(server.url) as client:
        for s in ("1", "2", "3"):
            info = client.stream(f"{dataset_dir.name}-subject-{s}")
            assert info.fixations == len(expected[s]) and info.resets == 3
    printed = capsys.readouterr().out
    assert f"replayed {len(lines)} fixations of 3 streams" in printed
    assert "error by step" in printed
    assert "error: 1 - cos(prediction, target), 0 to 2" in printed  # the test server's FOVEATE_LOSS
    summary = summarize([ReplayRecord(**line) for line in lines])
    assert summary.skill is not None and summary.mean_repeat_error is not None
    assert f"current one): mean error {summary.mean_repeat_error:.4f}" in printed
    assert f"skill 1 - model/repeat = {summary.skill:+.3f}" in printed
    for name in (ERROR_VS_FIXATIONS_PNG, ERROR_BY_STEP_PNG):
        png = plots / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = cv2.imread(str(png))
        assert image is not None and image.shape[0] > 200 and image.shape[1] > 300
        assert image.std() > 10  # drawn, not blank


def test_realtime_pace_follows_the_recorded_durations(server: FoveateProcess) -> None:
    ds = RecordedDataset.open(bundled_dataset_path())
    durations = [f.duration_ms for f, _ in ds.session("4", 1)]
    speed = 4.0
    opts = ReplayOptions(subjects=["4"], images=1, realtime=True, speed=speed, stream_prefix="rt-")
    start = time.perf_counter()
    records, summary = replay(ds, server.url, opts)
    elapsed = time.perf_counter() - start
    assert summary.fixations == len(durations) == len(records)
    assert elapsed >= sum(durations) / 1000.0 / speed - 0.05
    # Onsets are the recorded durations, summed.
    assert [r.t for r in records] == pytest.approx(np.cumsum([0.0, *durations[:-1]]) / 1000.0)


def test_replay_embedded_in_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Any) -> None:
    for key, value in SMALL_ENV.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "embedded.jsonl"
    argv = ["replay", str(bundled_dataset_path()), "--embedded", "--subjects", "2,5", "--images", "2",
            "--patch-deg", "2", "--encoding", "png", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    ds = RecordedDataset.open(bundled_dataset_path())
    check_lines(read_lines(out), expected_sessions(ds, ["2", "5"], 2, 48))  # 2 deg x 24 px/deg
    assert "replayed" in capsys.readouterr().out


def test_off_image_fixations_are_skipped_and_their_reset_carries_over(
    server: FoveateProcess, tmp_path: Path
) -> None:
    root = tmp_path / "tiny"
    (root / "stimuli").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        cv2.imwrite(
            str(root / "stimuli" / name), np.random.default_rng(0).integers(0, 256, (80, 100, 3), np.uint8)
        )
    rows = ["image,subject,fix_index,x_px,y_px,duration_ms",
            "a.png,7,0,-500,-500,100",  # far off the image: cannot be cut
            "a.png,7,1,50,40,120", "a.png,7,2,20,20,90",
            "b.png,7,0,60,30,100", "b.png,7,1,10,70,110"]  # fmt: skip
    (root / "fixations.csv").write_text("\n".join(rows) + "\n")
    ds = RecordedDataset.open(root)
    records, summary = replay(ds, server.url, ReplayOptions(size_px=20, stream_prefix="tiny-"))
    assert summary.skipped == 1 and summary.fixations == 4
    assert [(r.image, r.fix_index, r.reset, r.step) for r in records] == [
        ("a.png", 1, True, 1), ("a.png", 2, False, 2),
        ("b.png", 0, True, 1), ("b.png", 1, False, 2)]  # fmt: skip
    # The size in degrees needs pixels per degree, which this dataset lacks.
    with pytest.raises(Exception, match="pixels per degree"):
        replay(ds, server.url, ReplayOptions(size_deg=2.0))


def test_replay_cli_reports_errors_clearly(tmp_path: Path, capsys: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    argv = [
        "replay",
        str(bundled_dataset_path()),
        "--server",
        dead,
        "--subjects",
        "1",
        "--images",
        "1",
        "--no-progress",
    ]
    assert main(argv) == 1
    assert "cannot connect" in capsys.readouterr().err
    assert main(["replay", str(tmp_path / "missing"), "--server", dead]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["replay", str(bundled_dataset_path()), "--server", dead, "--subjects", "99"]) == 1
    assert "subject '99'" in capsys.readouterr().err


def test_demo_command_end_to_end(tmp_path: Path) -> None:
    env = subprocess_env(FOVEATE_DATASET=str(bundled_dataset_path()))
    done = subprocess.run(
        [sys.executable, "-m", "foveate", "--log-level", "WARNING", "demo",
         "--subjects", "1,2,3", "--images", "2", "--out-dir", str(tmp_path / "demo")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    ds = RecordedDataset.open(bundled_dataset_path())
    lines = read_lines(tmp_path / "demo" / "fixations.jsonl")
    check_lines(lines, expected_sessions(ds, ["1", "2", "3"], 2, 50))
    assert f"replayed {len(lines)} fixations of 3 streams" in done.stdout
    assert "first 20%" in done.stdout and "error by step" in done.stdout
    assert "repeat baseline" in done.stdout and "skill 1 - model/repeat" in done.stdout
    assert (tmp_path / "demo" / ERROR_VS_FIXATIONS_PNG).stat().st_size > 10_000
    assert (tmp_path / "demo" / ERROR_BY_STEP_PNG).stat().st_size > 10_000


def test_summary_and_running_mean() -> None:
    records = [ReplayRecord("s", "1", "a", i, i, i == 0, 0.0, i + 1, None if i == 0 else float(i), None, i)
               for i in range(11)]  # fmt: skip
    summary = summarize(records, seconds=2.0)
    assert (summary.fixations, summary.scored, summary.updates_applied) == (11, 10, 10)
    assert summary.error_first == pytest.approx(1.5) and summary.error_last == pytest.approx(9.5)
    assert summary.error_by_step[2] == 1.0 and summary.count_by_step[11] == 1
    assert summary.rate == pytest.approx(5.5)
    np.testing.assert_allclose(running_mean(np.arange(5.0), 3), [0, 0.5, 1, 2, 3])


def test_summary_weighs_the_model_against_the_repeat_baseline() -> None:
    def rec(step: int, error: float | None, repeat: float | None, skipped: bool = False) -> ReplayRecord:
        return ReplayRecord("s", "1", "a", step, step, step == 1, 0.0, step, error, None, 0, repeat, skipped)

    records = [rec(1, None, None), rec(2, 0.25, 0.5, skipped=True), rec(3, 0.5, 0.25), rec(2, 0.125, 0.5),
               rec(3, 0.25, 0.25)]  # fmt: skip
    summary = summarize(records)
    assert summary.mean_error == pytest.approx(0.28125) and summary.mean_repeat_error == pytest.approx(0.375)
    assert summary.skill == pytest.approx(1 - 0.28125 / 0.375)  # 1 - mean error / mean repeat error
    assert summary.repeat_error_by_step == {2: 0.5, 3: 0.25}
    assert summary.skill_by_step == pytest.approx({2: 1 - 0.1875 / 0.5, 3: 1 - 0.375 / 0.25})
    assert summary.ill_conditioned == 1
    # a server that reports no repeat errors: no baseline, no skill
    old = summarize([rec(1, None, None), rec(2, 0.25, None)])
    assert (old.mean_repeat_error, old.skill, old.skill_by_step) == (None, None, {})
    # the JSON line carries the baseline
    line = json.loads(records[1].to_json())
    assert (line["error"], line["repeat_error"], line["skipped"]) == (0.25, 0.5, True)


def _red_pixels(png: Path) -> int:
    """Pixels of matplotlib's C3 (#d62728), the repeat baseline's colour."""
    image = cv2.imread(str(png)).astype(np.int16)  # BGR
    return int((np.abs(image - np.array([40, 39, 214])).max(axis=2) < 30).sum())


def test_plots_draw_the_repeat_baseline_beside_the_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    records = []
    for i in range(300):
        step = i % 10 + 1
        error = None if step == 1 else float(rng.uniform(0.1, 0.5))
        repeat = None if step == 1 else float(rng.uniform(0.3, 0.6))
        records.append(ReplayRecord("s", "1", "a", i, i, step == 1, 0.0, step, error, None, i, repeat))
    with_repeat = plot_replay(records, tmp_path / "with")
    without = plot_replay([dataclasses.replace(r, repeat_error=None) for r in records], tmp_path / "without")
    for drawn, bare in zip(with_repeat, without, strict=True):
        assert drawn.name == bare.name
        assert _red_pixels(drawn) > 200 and _red_pixels(bare) == 0, drawn.name


def test_the_printed_summary_says_what_the_error_is_and_lists_every_step(capsys: Any) -> None:
    """The by-step table goes on as far as the by-step figure (it once stopped after 12 steps), and
    the error is named by the server's loss."""
    from clients.cli import _report

    def rec(i: int) -> ReplayRecord:
        error, repeat = (None, None) if i == 0 else (0.5 + i / 100, 1.0)
        return ReplayRecord("s", "1", "a", i, i, i == 0, 0.0, i + 1, error, None, i, repeat)

    records = [rec(i) for i in range(20)]
    summary = summarize(records, seconds=1.0)
    summary.loss = "whitened_mse"
    _report(summary, [], None)
    printed = capsys.readouterr().out
    assert (
        "error: whitened squared error" in printed
        and "repeating the current embedding scores about 1" in printed
    )
    rows = [
        line.split() for line in printed.splitlines() if line.startswith("  ") and line.split()[0].isdigit()
    ]
    assert [int(r[0]) for r in rows] == list(range(2, 21))
