"""The paper's figures (issue 5): ``python -m bench.paper_figures`` on a tiny held-out split.

The run uses the bundled OSIE subset, a few images, three training and two held-out subjects, and a
small model (32 units, D = 16) on the seeded random resnet18 at 64 px, so it takes seconds; the
full-size run is documented in ``docs/results.md``.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from bench.osie_learning import feature_ticks, replay, stream
from bench.paper_figures import (
    FIG3_PNG,
    FIG4_PNG,
    JSON_NAME,
    main,
    make_split,
    parse_subjects,
    untrained_reference,
)
from bench.paper_plots import MODELS, compact_ids, format_summary, plot_fig3, plot_fig4
from clients.recorded import RecordedDataset, bundled_dataset_path
from learner import ModelConfig, RFPLearner
from learner.errors import ConfigError

TINY = ["--n-units", "32", "--embed-dim", "16", "--pred-hidden", "32", "--input-size", "64"]
ARGS = ["--train-images", "4", "--test-images", "3", "--train-subjects", "1-3", "--test-subjects", "4,5"]


@pytest.fixture(scope="module")
def dataset() -> RecordedDataset:
    return RecordedDataset.open(bundled_dataset_path())


@pytest.fixture(scope="module")
def produced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("figures")
    main(["--dataset", str(bundled_dataset_path()), *ARGS, *TINY, "--set", "lr=1e-3", "--out-dir", str(out)])
    return out, json.loads((out / JSON_NAME).read_text())


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_writes_both_figures_as_valid_pngs(produced: tuple[Path, dict[str, Any]]) -> None:
    out, _ = produced
    for name in (FIG3_PNG, FIG4_PNG):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        img = imread(path)  # (H, W, 4) floats in [0, 1]
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600, img.shape
        assert float(img[..., :3].std()) > 0.05, f"{name} looks blank"


def test_json_holds_every_figure_number_finite(produced: tuple[Path, dict[str, Any]]) -> None:
    _, res = produced
    expected = {"config", "split", "dataset", "fig3", "fig4", "summary", "seconds", "machine", "command"}
    assert expected <= set(res), sorted(expected - set(res))
    assert res["config"]["n_units"] == 32 and res["config"]["lr"] == 1e-3 and res["embed_dim"] == 16
    for m in MODELS:
        assert all(_finite(v) for v in res["summary"][m].values()), res["summary"][m]
        steps = res["fig4"]["by_step"][m]
        assert {"2", "3", "4"} <= set(steps), steps.keys()
        for stats in [*steps.values(), *res["fig4"]["repeat_by_step"][m].values()]:
            assert _finite(stats["mean"]) and _finite(stats["sem"]) and stats["n"] >= 1
        spectrum = res["fig3"]["spectrum"][m]
        assert len(spectrum) == 16 and all(_finite(v) and v >= 0 for v in spectrum)
        assert 1 <= res["summary"][m]["effective_dim"] <= 16
    for name in ("rfp", "bptt"):
        curve = res["fig4"]["learning_curve"][name]
        assert curve and all(_finite(c["mean"]) for c in curve)
        assert curve[-1]["fixations"] > curve[0]["fixations"]
    pca = res["fig3"]["pca"]
    assert pca["paths"] and all(np.isfinite(p["xy"]).all() and len(p["xy"]) >= 6 for p in pca["paths"])
    assert len({p["image"] for p in pca["paths"]}) > 1  # distinct images come first
    assert all(_finite(v) and v >= 0 for v in res["seconds"].values())
    assert res["machine"]["cpu_count"] >= 1 and res["machine"]["torch"] == torch.__version__


def test_figures_and_table_redraw_from_the_json_alone(
    produced: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    _, res = produced
    plot_fig4(res, tmp_path / "a.png")
    plot_fig3(res, tmp_path / "b.png")
    assert imread(tmp_path / "a.png").shape[0] > 300 and imread(tmp_path / "b.png").shape[0] > 300
    table = format_summary(res)
    rfp = res["summary"]["rfp"]
    assert f"{rfp['test_error']:.4f}" in table and f"{rfp['effective_dim']:.1f}/16" in table
    assert "subjects 4-5 x images 5-7" in table and "trained on subjects 1-3 x images 1-4" in table


def test_held_out_subjects_and_images_are_disjoint_from_training(
    produced: tuple[Path, dict[str, Any]], dataset: RecordedDataset
) -> None:
    _, res = produced
    sp = res["split"]
    assert sp["train_subjects"] == ["1", "2", "3"] and sp["test_subjects"] == ["4", "5"]
    assert sp["train_images"] == dataset.images[:4] and sp["test_images"] == dataset.images[4:7]
    assert not set(sp["train_subjects"]) & set(sp["test_subjects"])
    assert not set(sp["train_images"]) & set(sp["test_images"])
    assert res["disjoint"] == {"subjects": True, "images": True}

    # the evaluation saw exactly the held-out subjects' fixations on the held-out images
    def count(subjects: list[str], images: list[str]) -> int:
        return sum(len(dataset.scanpath(i, s)) for s in subjects for i in images)

    assert res["dataset"]["test_fixations"] == count(sp["test_subjects"], sp["test_images"])
    assert res["dataset"]["train_fixations"] == count(sp["train_subjects"], sp["train_images"])


def test_rfp_and_bptt_take_the_same_number_of_updates(produced: tuple[Path, dict[str, Any]]) -> None:
    _, res = produced
    updates = res["updates_applied"]
    assert updates["rfp"] == updates["bptt"] > 0
    # one step per tick with a scored stream: never more than the training fixations
    assert updates["rfp"] < res["dataset"]["train_fixations"]


def test_replay_repeat_baseline_is_the_error_of_predicting_z_again(dataset: RecordedDataset) -> None:
    learner = RFPLearner(ModelConfig(n_units=16, embed_dim=8, pred_hidden=16))
    ticks = feature_ticks(learner, dataset, images=dataset.images[:2], subjects=["1", "2"])
    stream(learner, ticks, learn=True)
    records = replay(learner, ticks)
    by_stream: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_stream.setdefault(r["stream"], []).append(r)
    checked = 0
    for recs in by_stream.values():
        for prev, cur in itertools.pairwise(recs):
            if cur["step"] == 1:  # a new image: nothing to repeat
                assert cur["repeat_error"] is None and cur["error"] is None
                continue
            a, b = torch.as_tensor(prev["z"]), torch.as_tensor(cur["z"])
            with torch.no_grad():  # the model's own loss, D(z_{t-1}, z_t)
                expected = float(learner.model.distance(a[None].float(), b[None].float()))
            assert cur["repeat_error"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
            checked += 1
    assert checked > 20


def test_untrained_reference_keeps_its_weights_and_gathers_statistics(dataset: RecordedDataset) -> None:
    cfg = ModelConfig(n_units=16, embed_dim=8, pred_hidden=16, lr=1e-2)
    fresh = RFPLearner(cfg)
    ticks = feature_ticks(fresh, dataset, images=dataset.images[:2], subjects=["1", "2"])
    ref, seconds = untrained_reference(cfg, ticks, epochs=1, device="cpu")
    assert seconds > 0
    init = dict(fresh.model.named_parameters())
    for name, p in ref.model.named_parameters():
        assert torch.equal(p, init[name]), name
    if ref.model.input_norm is not None:  # whitening statistics of exactly the ticks' inputs
        assert ref.model.input_norm.state_dict()["count"].item() == sum(len(t.ids) for t in ticks)


def test_split_defaults_and_subject_ranges(dataset: RecordedDataset) -> None:
    split = make_split(dataset)
    assert len(split.train_subjects) == 12 and split.test_subjects == ["13", "14", "15"]
    assert not set(split.train_images) & set(split.test_images)
    assert len(split.train_images) + len(split.test_images) <= len(dataset.images)
    only_test = make_split(dataset, train_images=2, test_images=1, test_subjects=["2"])
    assert "2" not in only_test.train_subjects and len(only_test.train_subjects) == 14
    assert parse_subjects("1-3, 7,10-11", dataset.subjects) == ["1", "2", "3", "7", "10", "11"]
    assert compact_ids(["1", "2", "3", "7", "10", "11"]) == "1-3,7,10-11"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_subjects": ["1", "2"], "test_subjects": ["2", "3"]}, "disjoint"),
        ({"train_images": 30, "test_images": 20}, "at most"),
        ({"train_images": 0}, ">= 1"),
    ],
)
def test_bad_split_is_refused_with_what_to_fix(
    dataset: RecordedDataset, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_split(dataset, **kwargs)


def test_bad_options_are_refused(dataset: RecordedDataset, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown ids"):
        parse_subjects("1-3,99", dataset.subjects)
    common = ["--dataset", str(bundled_dataset_path()), "--out-dir", str(tmp_path)]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        main([*common, "--set", "no_such_field=1"])
    with pytest.raises(ConfigError, match="epochs"):
        main([*common, *ARGS, "--epochs", "0"])
    assert not list(tmp_path.iterdir())  # nothing half-written
