"""Learning on real eye-tracking data: OSIE sessions streamed through online RFP (issue 2).

One stream per subject, images in a fixed order, scanpaths in order, a reset at each new image.
The full version is ``python -m bench.osie_learning``; this is a small one (40 images).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.osie_learning import run
from clients.recorded import bundled_dataset_path
from learner import ModelConfig

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "osie"


@pytest.fixture(scope="module")
def result() -> dict:
    # the bundled subset is the first 40 OSIE images; the shared copy gives the same numbers
    dataset = SHARED if SHARED.is_dir() else bundled_dataset_path()
    return run(dataset, ModelConfig(), train_images=30, test_images=10)


@pytest.mark.slow
def test_online_rfp_lowers_error_of_later_fixations(result: dict) -> None:
    assert result["train_fixations"] > 4000 and result["updates_applied"] > 250
    # prequential: each fixation is scored before the model learns from it
    assert result["train_tail_error"] < 0.85 * result["untrained_tail_error"], result
    # and it carries over to images the model has never seen
    assert result["test_error_after"] < 0.9 * result["test_error_before"], result


@pytest.mark.slow
def test_embedding_does_not_collapse(result: dict) -> None:
    # the context whitening (cfg.context_norm) is what holds this once the RGC keeps memory
    assert result["effective_dim_after"] > result["embed_dim"] / 4, result["effective_dim_after"]


@pytest.mark.slow
def test_error_falls_with_time_step_after_learning(result: dict) -> None:
    # the gate biases and the gains' larger learning rate (cfg.gain_lr_scale) give the RGC memory
    by_step = result["test_by_step_after"]
    early = by_step[2]["mean"]
    late = sum(by_step[s]["mean"] for s in (6, 7, 8)) / 3
    assert late < early - 2 * by_step[2]["sem"], by_step
