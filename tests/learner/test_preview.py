"""The predictor's optional preview input (``ModelConfig.preview_features``): what it refuses.

Its exactness (RFP against BPTT with the preview) is in ``test_rfp_exact``."""

from __future__ import annotations

import pytest
import torch

from learner import ModelConfig, RFPLearner
from learner.bptt import BPTTLearner
from learner.errors import ConfigError, InputError

TINY = dict(trunk="none", in_features=8, n_units=6, embed_dim=4, pred_hidden=5, input_norm=False)


def test_a_preview_model_asks_for_the_preview_by_shape() -> None:
    learner = RFPLearner(ModelConfig(**TINY, preview_features=3))
    u = torch.randn(2, 8)
    with pytest.raises(InputError, match=r"pass preview of shape \(2, 3\)"):
        learner.tick_features(["a", "b"], u)
    with pytest.raises(InputError, match=r"preview must have shape \(2, 3\), got \(2, 4\)"):
        learner.tick_features(["a", "b"], u, preview=torch.randn(2, 4))
    with pytest.raises(InputError, match="NaN"):
        learner.tick_features(["a", "b"], u, preview=torch.full((2, 3), float("nan")))
    out = learner.tick_features(["a", "b"], u, preview=torch.randn(2, 3))
    assert out.error.isnan().all()  # first fixations: nothing predicted, the preview is ignored
    out = learner.tick_features(["a", "b"], torch.randn(2, 8), preview=torch.randn(2, 3))
    assert torch.isfinite(out.error).all() and out.step.tolist() == [2, 2]


def test_a_model_without_a_preview_refuses_one() -> None:
    learner = RFPLearner(ModelConfig(**TINY))
    with pytest.raises(InputError, match="reads no preview"):
        learner.tick_features(["a"], torch.randn(1, 8), preview=torch.randn(1, 3))


def test_preview_configurations_that_cannot_work_are_refused() -> None:
    with pytest.raises(ConfigError, match="predictor='residual' or 'mlp'"):
        ModelConfig(**TINY, preview_features=3, predictor="linear")
    with pytest.raises(ConfigError, match="preview_features must be >= 0"):
        ModelConfig(**TINY, preview_features=-1)
    with pytest.raises(ConfigError, match="BPTTLearner does not read a preview"):
        BPTTLearner(ModelConfig(**TINY, preview_features=3))


def test_the_preview_is_what_makes_the_next_fixation_predictable() -> None:
    """Each next input is random, so only its preview (here the input itself) predicts it: with the
    preview the model's error falls well below the repeat baseline's; without, it cannot."""
    gen = torch.Generator().manual_seed(0)
    cfg = dict(TINY, lr=1e-2, embed_lr_scale=0.0, segment_len=0, input_norm=True)
    with_preview = RFPLearner(ModelConfig(**cfg, preview_features=8))
    without = RFPLearner(ModelConfig(**cfg))
    ratios = {}
    for name, learner in (("with", with_preview), ("without", without)):
        gen.manual_seed(0)
        errors, repeats = [], []
        for t in range(1200):
            u = torch.randn(4, 8, generator=gen)
            preview = u if name == "with" else None
            out = learner.tick_features(list("abcd"), u, preview=preview)
            if t >= 1000:
                errors.append(out.error)
                repeats.append(out.repeat_error)
        ratios[name] = float(torch.cat(errors).mean() / torch.cat(repeats).mean())
    assert ratios["with"] < 0.75 * ratios["without"], ratios


def test_the_preview_projection_learns_at_its_own_rate() -> None:
    """``preview_lr_scale``: Q is a group of its own at lr x scale. Q starts at zero, so every run is
    the same until Q's first step; that step is ten times larger at scale 10 than at 1, and at 0 Q
    never moves while G learns."""
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(8, 2, 8, generator=gen), torch.randn(8, 2, 3, generator=gen)
    first = {}
    for scale in (0.0, 1.0, 10.0):
        cfg = ModelConfig(**TINY, preview_features=3, loss="mse", lr=1e-3, preview_lr_scale=scale)
        learner = RFPLearner(cfg)
        assert learner.optimizer.param_groups[3]["lr"] == 1e-3 * scale
        assert learner.model.Q is not None
        q = torch.zeros(5, 3)
        for t in range(8):
            learner.tick_features(["a", "b"], u[t], preview=v[t])
            q = learner.model.Q.weight.detach().clone()
            if q.abs().max() > 0:
                break
        first[scale] = q
        assert float(learner.model.G.lin2.weight.abs().max()) > 0  # G learned either way
    assert float(first[0.0].abs().max()) == 0.0 and float(first[1.0].abs().max()) > 0
    assert torch.allclose(first[10.0], 10 * first[1.0], rtol=1e-3, atol=0)
