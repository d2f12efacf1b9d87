"""bench.controls: the controls of spec 1.6 are what they say, and the command runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.controls import (
    Scanpath,
    by_image,
    cached_features,
    iid_other_images,
    lockstep_ticks,
    main,
    parse_range,
    scanpaths_of,
    shuffled,
    with_previews,
)
from clients.recorded import RecordedDataset, bundled_dataset_path
from learner import ModelConfig, RFPLearner


def paths() -> list[Scanpath]:
    """Scanpaths whose features name their image and position: u[t] = [image, t, ...]."""
    out = []
    for image in range(4):
        for subject in range(2):
            n = 3 + image
            u = torch.zeros(n, 5)
            u[:, 0], u[:, 1], u[:, 2] = image, torch.arange(n), subject
            out.append(Scanpath(str(subject), f"im{image}", u))
    return out


def previewed(src: list[Scanpath]) -> list[Scanpath]:
    """The scanpaths with a preview that names its fixation: v[t] = 10 u[t, :3]."""
    return [Scanpath(p.subject, p.image, p.u, 10 * p.u[:, :3]) for p in src]


def test_every_control_keeps_each_fixations_preview_with_it() -> None:
    """A preview is what the eye saw of the patch that lands: shuffled, i.i.d. and replayed
    fixations carry their own (``bench.controls --preview``)."""
    src = previewed(paths())
    for got in (shuffled(src, torch.Generator().manual_seed(0)), iid_other_images(src, torch.Generator())):
        for p in got:
            assert p.v is not None and torch.equal(p.v, 10 * p.u[:, :3])
    for tick in lockstep_ticks(src, width=3) + with_previews(lockstep_ticks(src, width=3), src):
        assert tick.preview is not None and torch.equal(tick.preview, 10 * tick.u[:, :3])


def test_parse_range_takes_one_based_positions() -> None:
    names = ["1", "2", "3", "10", "11"]
    assert parse_range("1-3", names) == ["1", "2", "3"]
    assert parse_range("2,4-5", names) == ["2", "10", "11"]
    with pytest.raises(SystemExit):
        parse_range("4-6", names)


def test_shuffled_keeps_each_scanpaths_fixations_in_another_order() -> None:
    src = paths()
    got = shuffled(src, torch.Generator().manual_seed(0))
    moved = 0
    for a, b in zip(src, got, strict=True):
        assert (a.subject, a.image) == (b.subject, b.image)
        assert sorted(b.u[:, 1].tolist()) == a.u[:, 1].tolist()  # the same fixations
        moved += int(not torch.equal(a.u, b.u))
    assert moved > 0


def test_iid_control_takes_every_patch_from_another_image() -> None:
    src = paths()
    got = iid_other_images(src, torch.Generator().manual_seed(1))
    images = set()
    for a, b in zip(src, got, strict=True):
        assert len(a.u) == len(b.u)
        assert all(int(img) != int(a.u[0, 0]) for img in b.u[:, 0])  # never its own image
        images.update(int(img) for img in b.u[:, 0])
    assert len(images) == 4


def test_lockstep_ticks_replay_every_scanpath_from_a_reset() -> None:
    src = paths()
    ticks = lockstep_ticks(src, width=3)
    seen: dict[tuple[str, str], list[float]] = {}
    for tick in ticks:
        assert len(set(tick.ids)) == len(tick.ids)
        for i, (subject, image, t) in enumerate(tick.meta):
            assert tick.reset[i] == (t == 0)
            seen.setdefault((subject, image), []).append(float(tick.u[i, 1]))
    assert len(seen) == len(src)
    for p in src:
        assert seen[(p.subject, p.image)] == p.u[:, 1].tolist()  # in order, each once


def test_standard_errors_are_over_images() -> None:
    records = [
        {"image": "a", "error": 1.0},
        {"image": "a", "error": 3.0},  # image a: mean 2
        {"image": "b", "error": 4.0},  # image b: mean 4
        {"image": "c", "error": 6.0},  # image c: mean 6
    ]
    mean, sem, n = by_image(records, lambda r: r["error"])
    assert (mean, n) == (4.0, 3)
    assert sem == pytest.approx(2.0 / 3**0.5)  # std of (2, 4, 6) is 2


@pytest.mark.slow
def test_the_command_reports_every_control_and_combines_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "--dataset",
        str(bundled_dataset_path()),
        "--train-subjects",
        "1-3",
        "--train-images",
        "1-3",
        "--test-subjects",
        "13-14",
        "--test-images",
        "4-6",
        "--retrieval",
        "12",
        "--threads",
        "1",
        "--cache",
        str(tmp_path / "cache"),
    ]
    main([*args, "--seeds", "0", "--out-dir", str(tmp_path / "s0")])
    res = json.loads((tmp_path / "s0" / "controls.json").read_text())
    (seed,) = res["seeds"]
    for key in (
        "transfer",
        "untrained",
        "shuffled",
        "iid",
        "online_held_out_second_half",
        "train_second_half",
    ):
        summary = seed[key]
        assert summary["fixations"] > 0 and summary["images"] >= 1, key
        assert summary["skill"] == pytest.approx(1 - summary["error"][0] / summary["repeat"][0])
    assert seed["untrained"]["model_minus_repeat"][0] == pytest.approx(0.0, abs=1e-6)  # identity G
    assert seed["retrieval"]["n"] == 12 and 0 <= seed["retrieval"]["model"] <= 1
    assert set(seed["fall"]) == {"model", "repeat", "shuffled", "iid"}
    assert (tmp_path / "s0" / "controls_by_step.png").stat().st_size > 1000
    assert list((tmp_path / "cache").glob("features-*.pt"))  # the trunk ran once per patch
    main([*args, "--seeds", "1", "--out-dir", str(tmp_path / "s1")])
    capsys.readouterr()
    main(["--combine", str(tmp_path / "s0" / "controls.json"), str(tmp_path / "s1" / "controls.json")])
    table = capsys.readouterr().out
    assert "| measure | seed 0 | seed 1 |" in table and "retrieval top-1: model" in table


@pytest.mark.slow
def test_the_command_runs_the_controls_with_a_preview_input(tmp_path: Path) -> None:
    """``--preview saccade+preview --preview-dims 8``: the model reads the top 8 principal components
    of the trunk's features of each fixation's peripheral preview and the saccade's 15 features, and
    every control runs with them; here with the target variants and Q's own learning rate, and two
    passes over the training split (each of its fixations learned from twice)."""
    main(
        [
            "--set",
            "embed_pcs=4",
            "embed_state_scale=0.5",
            "preview_lr_scale=10",
            "--epochs",
            "2",
            "--dataset",
            str(bundled_dataset_path()),
            "--train-subjects",
            "1-2",
            "--train-images",
            "1-2",
            "--test-subjects",
            "13",
            "--test-images",
            "4-5",
            "--retrieval",
            "6",
            "--threads",
            "1",
            "--seeds",
            "0",
            "--preview",
            "saccade+preview",
            "--preview-dims",
            "8",
            "--cache",
            str(tmp_path / "cache"),
            "--out-dir",
            str(tmp_path),
        ]
    )
    res = json.loads((tmp_path / "controls.json").read_text())
    assert res["preview"] == "saccade+preview"
    assert res["config"]["preview_features"] == 8 + 15  # the preview's components, the saccade's features
    (seed,) = res["seeds"]
    for key in ("transfer", "shuffled", "iid", "online_held_out_second_half"):
        assert seed[key]["fixations"] > 0 and torch.isfinite(torch.tensor(seed[key]["skill"])), key
    assert seed["untrained"]["model_minus_repeat"][0] == pytest.approx(0.0, abs=1e-6)  # identity G
    assert seed["retrieval"]["n"] == 6
    assert list((tmp_path / "cache").glob("preview-*.pt"))  # the previews went through the trunk
    assert res["epochs"] == 2 and res["config"]["embed_pcs"] == 4 and res["config"]["preview_lr_scale"] == 10
    ds = RecordedDataset.open(bundled_dataset_path())
    learner = RFPLearner(ModelConfig())
    train = scanpaths_of(cached_features(learner, ds, ds.images[:2], ds.subjects[:2], 50, tmp_path / "cache"))
    assert seed["train_fixations"] == 2 * sum(len(p.u) - 1 for p in train)  # every pass scored them all
