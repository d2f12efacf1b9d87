"""The embedding's opt-in target variants (``ModelConfig.embed_pcs``, ``embed_state_scale``): the
basis they read and the configurations they refuse. Their exactness is in ``test_rfp_exact``."""

from __future__ import annotations

import pytest
import torch

from learner import ModelConfig, RFPLearner
from learner.errors import ConfigError
from learner.whitening import RunningWhitening

TINY = dict(trunk="none", in_features=8, n_units=6, embed_dim=4, pred_hidden=5)


def test_the_basis_is_the_top_eigenvectors_and_keeps_its_signs() -> None:
    """Inputs with variances 8 > 4 > 1 = ...: the basis spans the first two axes; a recompute whose
    eigenvectors come back with flipped signs leaves it as it was (else the embedding would flip)."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 1, 1, 1, 1, 2, 1, 1, 2**1.5])  # std: variances 8 (axis 8) and 4 (axis 5)
    norm = RunningWhitening(9, every=4, top=2)
    for _ in range(64):
        norm.observe(torch.randn(16, 9, generator=gen) * scales)
    basis = norm.basis.clone()  # (9, 2), ascending: the largest last
    assert basis[:, 1].abs().argmax() == 8 and basis[:, 0].abs().argmax() == 5
    assert float(basis[5, 0].abs()) > 0.95 and float(basis[8, 1].abs()) > 0.95
    evecs = torch.linalg.eigh(norm.covariance())[1]
    norm._keep_top(-evecs)
    assert torch.allclose(norm.basis, basis, atol=1e-4)


def test_the_embedding_reads_the_basis_and_the_scaled_state() -> None:
    learner = RFPLearner(ModelConfig(**TINY, embed_pcs=3, embed_state_scale=0.5, segment_len=0))
    model = learner.model
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        learner.tick_features(["a", "b"], torch.randn(2, 8, generator=gen))
    u, h = model.normalize(torch.randn(5, 8, generator=gen), update=False), torch.randn(5, 6, generator=gen)
    s = model.context_norm.transform(h)
    e = model.E.weight  # (D, 3 + N)
    expected = (u @ model.input_norm.basis) @ e[:, :3].T + 0.5 * s @ e[:, 3:].T
    assert torch.allclose(model.embed(u, h), expected, atol=1e-5)
    assert float(model.input_norm.basis.abs().sum()) > 0  # recomputed from the inputs seen


def test_target_variants_that_cannot_work_are_refused() -> None:
    with pytest.raises(ConfigError, match="needs input_norm"):
        ModelConfig(**TINY, embed_pcs=3, input_norm=False)
    with pytest.raises(ConfigError, match="fewer than in_features=8"):
        ModelConfig(**TINY, embed_pcs=8)
    with pytest.raises(ConfigError, match="embed_from='context'"):
        ModelConfig(**TINY, embed_pcs=3, embed_from="state")
    with pytest.raises(ConfigError, match="must be >= 0"):
        ModelConfig(**TINY, embed_state_scale=-1.0)
