"""bench.preview_target: its replay is the learner's own forward pass, and the command runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bench.controls import Scanpath
from bench.osie_learning import _clone_frozen
from bench.preview_target import main, replay, skill, targets
from clients.recorded import bundled_dataset_path
from learner import ModelConfig, RFPLearner


def test_replay_gives_the_states_and_embeddings_of_the_frozen_learner() -> None:
    """After some learning (so the whitenings and the RGC are not trivial), the batched replay's
    states and its target ``z`` equal what a frozen learner's ticks give, fixation by fixation."""
    cfg = ModelConfig(trunk="none", in_features=8, n_units=6, embed_dim=4, pred_hidden=5, segment_len=0)
    learner = RFPLearner(cfg)
    gen = torch.Generator().manual_seed(0)
    for t in range(300):
        learner.tick_features(["a", "b"], torch.randn(2, 8, generator=gen), [t % 7 == 0] * 2)
    paths = [Scanpath("s", f"im{i}", torch.randn(3 + i, 8, generator=gen)) for i in range(4)]
    model = learner.model
    got = replay(model, paths, chunk=3)  # two chunks, of unequal lengths
    z_of = targets(model, torch.cat([p.u for p in paths]), ["z"])["z"]
    probe = _clone_frozen(learner)
    for p, r in zip(paths, got, strict=True):
        z = z_of(p.u, r["uw"], r["s"])  # (T, D)
        for t in range(len(p.u)):
            probe.tick_features(["x"], p.u[t : t + 1], [t == 0], learn=False)
            slot = probe.states.slots(["x"])
            h = probe.states.h[slot]  # (1, N)
            assert torch.allclose(r["h"][t], h[0], atol=1e-5)
            z_probe = probe.model.embed(probe.states.u[slot], h)[0]
            assert torch.allclose(z[t].float(), z_probe, atol=1e-4)


def test_skill_is_one_minus_the_pooled_ratio() -> None:
    err, rep = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 8.0])
    value, se = skill(err, rep, ["a", "a", "b"])
    assert value == pytest.approx(1 - 6 / 12) and se > 0  # the two images differ: a spread


@pytest.mark.slow
def test_the_command_reports_every_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(
        [
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
            "--dims",
            "4",
            "--threads",
            "1",
            "--targets",
            "z",
            "pcs4",
            "E:pcs4:0",
            "--cache",
            str(tmp_path),
        ]
    )
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    by = {(r[0].strip("| "), r[2]): r for r in rows[1:]}  # after the header
    for target in ("z", "pcs4", "E:pcs4:0"):
        for rule in ("repeat", "ridge [y_t]", "ridge [y_t, preview]"):
            assert (target, rule) in by, (target, rule)
        skill_cell = by[(target, "ridge [y_t, preview]")][3]
        assert math.isfinite(float(skill_cell.split(" ± ")[0]))
    assert ("z", "the model, G(z_t)") in by
