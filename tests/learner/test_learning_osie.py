"""Learning on real eye-tracking data, against the controls of spec 1.6 (issue 11), at test scale.

Trained online on OSIE subjects 1-12 x images 1-30 (one stream per subject, a reset at each new
image), then frozen and scored on subjects 13-15 x images 31-40, which it never saw. The full version,
with every control and two seeds, is ``python -m bench.controls`` (docs/results.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.controls import run
from clients.recorded import bundled_dataset_path
from learner import ModelConfig

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "osie"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result() -> dict:
    # the bundled subset is the first 40 OSIE images; the shared copy gives the same numbers
    dataset = SHARED if SHARED.is_dir() else bundled_dataset_path()
    res = run(
        dataset,
        ModelConfig(),
        train_subjects="1-12",
        train_images="1-30",
        test_subjects="13-15",
        test_images="31-40",
        seeds=[0],
        retrieval_n=40,
    )
    return res["seeds"][0]


def test_model_beats_repeating_the_current_embedding_on_held_out_people_and_images(result: dict) -> None:
    diff, sem = result["transfer"]["model_minus_repeat"]
    # measured, seeds 0 and 1: -0.0206 +- 0.0011 and -0.0213 +- 0.0013 (over 10 images), skill +0.036;
    # at this scale (3,000 ticks) the model has not yet learned what the full benchmark shows
    # (docs/results.md); an oracle shrinkage baseline still beats it here
    assert diff < -5 * sem and result["transfer"]["skill"] > 0.01, result["transfer"]
    # and while it keeps learning on them
    online = result["online_held_out_second_half"]
    assert online["model_minus_repeat"][0] < -5 * online["model_minus_repeat"][1], online


def test_learning_is_what_beats_it(result: dict) -> None:
    # untrained, the residual predictor is the identity: its error is the repeat baseline's
    untrained = result["untrained"]
    assert untrained["model_minus_repeat"][0] == pytest.approx(0.0, abs=1e-6), untrained


def test_embedding_keeps_its_dimensions(result: dict) -> None:
    # measured 53.7 and 55.6 of 120 (untrained 53.1 and 54.4): E is a fixed projection by default
    assert result["effective_dim"] > 40, result["effective_dim"]


def test_the_fresh_model_skips_its_ill_conditioned_first_ticks(result: dict) -> None:
    # whitened_mse learns once the whitenings have settled (16 ticks) and its metric has seen 8
    # changes: measured 165 of 2,992 fixations with 12 streams
    assert 0 < result["train_skipped"] < 300, result["train_skipped"]
