"""Tests for learner.diagnostics: every diagnostic checked against an answer known in advance.

The Theorem 1 check follows spec section 1.5: with balanced learning ``G^T G`` is proportional to the
embedding covariance, so a predictor built with that property must score a cosine of 1.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from learner import ModelConfig, RFPLearner
from learner.diagnostics import (
    Diagnostics,
    covariance_spectrum,
    offdiag_mass,
    participation_ratio,
    predictor_jacobian,
    theorem1,
)
from learner.model import RJEPA
from tests.learner.reference import rgc_forward

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rotation(d: int, seed: int) -> torch.Tensor:
    """A random orthogonal (d, d) matrix."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=F64))
    return q * torch.sign(torch.diagonal(r))  # fixes the sign ambiguity of QR


def psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """Symmetric square root S of a PSD matrix: S^T S = cov."""
    evals, evecs = torch.linalg.eigh(cov.double())
    return evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T


def with_spectrum(eigenvalues: list[float], seed: int) -> torch.Tensor:
    """A covariance matrix Q diag(l) Q^T with the given eigenvalues and random eigenvectors."""
    q = rotation(len(eigenvalues), seed)
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ q.T


def samples(cov: torch.Tensor, n: int, seed: int, mean: float = 0.0) -> torch.Tensor:
    """n Gaussian rows (n, D) with covariance ``cov``."""
    chol = torch.linalg.cholesky(cov)
    return torch.randn(n, cov.shape[0], generator=gen(seed), dtype=F64) @ chol.T + mean


def sample_cov(z: torch.Tensor) -> torch.Tensor:
    return torch.cov(z.T)  # unbiased, rows are observations


# --- participation ratio -----------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 7, 120])
def test_participation_ratio_of_isotropic_spectrum_is_dimension(d: int) -> None:
    assert participation_ratio(torch.full((d,), 2.5, dtype=F64)) == pytest.approx(d, rel=1e-12)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_participation_ratio_of_rank_k_equal_spectrum_is_k(k: int) -> None:
    lam = torch.zeros(16, dtype=F64)
    lam[:k] = 0.7
    assert participation_ratio(lam) == pytest.approx(k, rel=1e-12)


def test_participation_ratio_of_one_dominant_direction_is_about_one() -> None:
    lam = torch.tensor([1.0] + [1e-6] * 9, dtype=F64)
    pr = participation_ratio(lam)
    assert 1.0 <= pr < 1.0 + 1e-4


def test_participation_ratio_known_value_and_bounds() -> None:
    assert participation_ratio(torch.tensor([3.0, 1.0], dtype=F64)) == pytest.approx(16 / 10, rel=1e-12)
    lam = torch.rand(30, generator=gen(0), dtype=F64)
    assert 1.0 <= participation_ratio(lam) <= 30.0


@pytest.mark.parametrize("scale", [1e-6, 3.0, 1e6])
def test_participation_ratio_is_scale_invariant(scale: float) -> None:
    lam = torch.rand(12, generator=gen(1), dtype=F64)
    assert participation_ratio(lam * scale) == pytest.approx(participation_ratio(lam), rel=1e-12)


def test_participation_ratio_of_empty_or_zero_spectrum_is_zero_not_nan() -> None:
    # A collapsed (all-zero) or absent embedding reports 0 dimensions rather than 0/0.
    assert participation_ratio(torch.zeros(5, dtype=F64)) == 0.0
    assert participation_ratio(torch.zeros(0, dtype=F64)) == 0.0


def test_participation_ratio_ignores_negative_roundoff_and_accepts_float32() -> None:
    assert participation_ratio(torch.tensor([2.0, 2.0, -1e-12], dtype=F64)) == pytest.approx(2.0, rel=1e-12)
    out = participation_ratio(torch.tensor([1.0, 1.0, 1.0]))
    assert isinstance(out, float) and out == pytest.approx(3.0, rel=1e-6)


# --- covariance spectrum ---------------------------------------------------------------------------
def test_covariance_spectrum_exact_on_a_symmetric_design() -> None:
    # Rows +-a_i e_i (rotated, shifted): the sample covariance is exactly 2 diag(a^2) / (n - 1).
    a = torch.tensor([3.0, 0.5, 2.0, 1.0], dtype=F64)
    d = a.numel()
    rows = torch.cat([torch.diag(a), -torch.diag(a)])  # (2D, D), mean zero
    z = rows @ rotation(d, 2).T + torch.tensor([5.0, -1.0, 0.0, 2.0], dtype=F64)
    expected = (2 * a * a / (2 * d - 1)).sort(descending=True).values
    spec = covariance_spectrum(z)
    assert spec.dtype == F64 and spec.shape == (d,)
    torch.testing.assert_close(spec, expected, rtol=1e-12, atol=1e-12)


def test_covariance_spectrum_is_sorted_nonnegative_and_sums_to_trace() -> None:
    z = torch.randn(50, 6, generator=gen(3)) * torch.tensor([5.0, 1.0, 0.1, 2.0, 0.0, 3.0])  # float32
    spec = covariance_spectrum(z)
    assert spec.dtype == F64
    assert bool((spec[:-1] >= spec[1:]).all()) and bool((spec >= 0).all())
    assert float(spec.sum()) == pytest.approx(float(sample_cov(z.double()).trace()), rel=1e-10)


def test_covariance_spectrum_approaches_the_true_eigenvalues() -> None:
    true = [4.0, 2.0, 1.0, 0.5, 0.25]
    z = samples(with_spectrum(true, seed=4), n=20_000, seed=5, mean=7.0)
    # The standard error of each estimate is about lambda * sqrt(2 / n), 1 %; allow 5 %.
    torch.testing.assert_close(covariance_spectrum(z), torch.tensor(true, dtype=F64), rtol=0.05, atol=0.0)


def test_effective_dim_of_isotropic_samples_is_close_to_dimension() -> None:
    z = torch.randn(20_000, 8, generator=gen(6), dtype=F64)
    assert participation_ratio(covariance_spectrum(z)) == pytest.approx(8.0, rel=0.02)


def test_covariance_spectrum_of_points_on_a_line_has_rank_one() -> None:
    t = torch.randn(40, 1, generator=gen(7), dtype=F64)
    z = t * torch.tensor([[1.0, -2.0, 0.5]], dtype=F64)  # (40, 3), every row on one line
    spec = covariance_spectrum(z)
    assert float(spec[1:].abs().max()) < 1e-12 * float(spec[0])
    assert participation_ratio(spec) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("rows", [0, 1])
def test_covariance_spectrum_of_too_few_rows_is_zero(rows: int) -> None:
    spec = covariance_spectrum(torch.ones(rows, 3, dtype=F64))
    torch.testing.assert_close(spec, torch.zeros(3, dtype=F64))


# --- off-diagonal mass, Jacobian, Theorem 1 --------------------------------------------------------
def test_offdiag_mass_known_values() -> None:
    assert offdiag_mass(torch.diag(torch.tensor([1.0, 5.0, -2.0], dtype=F64))) == 0.0
    assert offdiag_mass(torch.zeros(3, 3, dtype=F64)) == 0.0
    assert offdiag_mass(torch.ones(2, 2, dtype=F64)) == pytest.approx(math.sqrt(2) / 2, rel=1e-12)
    assert offdiag_mass(torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)) == pytest.approx(1.0)


def test_predictor_jacobian_of_linear_is_its_weight() -> None:
    g = nn.Linear(4, 4).double()
    jac = predictor_jacobian(g, torch.zeros(4, dtype=F64))
    assert torch.equal(jac, g.weight) and not jac.requires_grad


def test_predictor_jacobian_of_mlp_keeps_only_active_hidden_units() -> None:
    # Hidden units 0-3 copy z with a large positive bias (ReLU active); unit 4 is switched off.
    g1, g2 = nn.Linear(4, 5).double(), nn.Linear(5, 4).double()
    with torch.no_grad():
        g1.weight.zero_()
        g1.weight[:4].copy_(torch.eye(4, dtype=F64))
        g1.weight[4] = 1.0
        g1.bias.copy_(torch.tensor([100.0] * 4 + [-100.0], dtype=F64))
        g2.weight.copy_(torch.randn(4, 5, generator=gen(8), dtype=F64))
    jac = predictor_jacobian(nn.Sequential(g1, nn.ReLU(), g2), torch.randn(4, generator=gen(9), dtype=F64))
    torch.testing.assert_close(jac, g2.weight[:, :4].detach(), rtol=1e-12, atol=1e-12)


def test_theorem1_cosine_is_one_when_gtg_equals_covariance() -> None:
    cov = with_spectrum([5.0, 2.0, 1.0, 0.3, 0.1], seed=10)
    g = rotation(5, 11) @ psd_sqrt(cov)  # not symmetric, yet G^T G = cov
    out = theorem1(g, cov)
    assert out["theorem1_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert out["gtg_offdiag"] == pytest.approx(out["cov_offdiag"], rel=1e-9)
    assert out["cov_offdiag"] == pytest.approx(offdiag_mass(cov), rel=1e-12)
    # Proportional is enough: spec 1.5 only claims G^T G ∝ Σ_z.
    assert theorem1(3.0 * g, cov)["theorem1_cosine"] == pytest.approx(1.0, abs=1e-12)


def test_theorem1_cosine_is_low_for_an_unrelated_predictor() -> None:
    q = rotation(4, 12)
    cov = q @ torch.diag(torch.tensor([10.0, 1.0, 0.1, 0.01], dtype=F64)) @ q.T
    flipped = q @ torch.diag(torch.tensor([0.1, 0.3162, 1.0, 3.162], dtype=F64)) @ q.T  # reversed spectrum
    assert theorem1(flipped, cov)["theorem1_cosine"] < 0.05
    random_g = torch.randn(4, 4, generator=gen(13), dtype=F64)
    assert theorem1(random_g, cov)["theorem1_cosine"] < 0.9


def test_theorem1_cosine_with_identity_is_sqrt_of_pr_over_d() -> None:
    # cos(I, Σ) = tr Σ / (sqrt(D) ||Σ||_F) = sqrt(PR(Σ) / D): ties the two diagnostics together.
    lam = [4.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    cov = with_spectrum(lam, seed=14)
    expected = math.sqrt(participation_ratio(torch.tensor(lam, dtype=F64)) / len(lam))
    out = theorem1(torch.eye(6, dtype=F64), cov)
    assert out["theorem1_cosine"] == pytest.approx(expected, rel=1e-12)
    assert out["gtg_offdiag"] == 0.0


def test_theorem1_with_zero_predictor_is_zero_not_nan() -> None:
    out = theorem1(torch.zeros(3, 3, dtype=F64), torch.eye(3, dtype=F64))
    assert out == {"theorem1_cosine": 0.0, "gtg_offdiag": 0.0, "cov_offdiag": 0.0}


# --- Diagnostics: error by step ----------------------------------------------------------------------
def observe_errors(d: Diagnostics, steps: list[int], errors: list[float]) -> None:
    b, dim = len(steps), d.embeddings().shape[1]
    d.observe(torch.tensor(steps), torch.tensor(errors, dtype=F64), torch.zeros(b, dim), torch.zeros(b, 2))


def test_error_by_step_means_skip_nan_and_pool_late_steps() -> None:
    d = Diagnostics(embed_dim=2, window=8, max_step=4)
    nan = float("nan")
    observe_errors(d, [1, 1, 2], [nan, nan, 0.2])  # first fixations are never scored
    observe_errors(d, [2, 3, 4], [0.4, 0.9, 1.0])
    observe_errors(d, [3, 7, 50], [0.3, 2.0, 3.0])  # 7 and 50 join the "4 or later" bucket
    means = d.error_by_step()
    assert list(means) == [2, 3, 4]  # no key for a step that was never scored
    assert means[2] == pytest.approx(0.3, rel=1e-12)
    assert means[3] == pytest.approx(0.6, rel=1e-12)
    assert means[4] == pytest.approx(2.0, rel=1e-12)


def test_error_by_step_recent_is_an_exponential_moving_average() -> None:
    d = Diagnostics(embed_dim=2, window=8, max_step=5, ema=0.5)
    for e in (1.0, 0.0, 0.0):
        observe_errors(d, [2], [e])
    assert d.error_by_step(recent=True) == {2: pytest.approx(0.25, rel=1e-12)}  # 1 -> 0.5 -> 0.25
    assert d.error_by_step() == {2: pytest.approx(1 / 3, rel=1e-12)}
    observe_errors(d, [3, 3], [4.0, 2.0])  # two in one tick: applied in order
    assert d.error_by_step(recent=True)[3] == pytest.approx(3.0, rel=1e-12)
    assert d.summary()["error_by_step_recent"] == d.error_by_step(recent=True)


# --- Diagnostics: window, spectrum, h, retention -----------------------------------------------------
def feed(d: Diagnostics, z: torch.Tensor, h: torch.Tensor | None = None, radius: float = 0.0) -> None:
    b = z.shape[0]
    h = torch.zeros(b, 3) if h is None else h
    d.observe(torch.full((b,), 2), torch.full((b,), 0.1), z, h, radius)


def test_window_keeps_the_last_embeddings_oldest_first() -> None:
    d = Diagnostics(embed_dim=2, window=4)
    z = torch.arange(20.0, dtype=F64).view(10, 2)  # row i = (2i, 2i + 1)
    feed(d, z[:3])
    torch.testing.assert_close(d.embeddings(), z[:3])  # not yet full: only what was seen
    feed(d, z[3:5])
    feed(d, z[5:6])
    torch.testing.assert_close(d.embeddings(), z[2:6])
    feed(d, z[6:10])  # wraps exactly once more
    torch.testing.assert_close(d.embeddings(), z[6:10])
    assert d.summary()["embeddings_seen"] == 10


def test_window_with_a_batch_larger_than_the_window_keeps_its_last_rows() -> None:
    d = Diagnostics(embed_dim=2, window=4)
    feed(d, torch.ones(3, 2, dtype=F64))
    z = torch.arange(12.0, dtype=F64).view(6, 2)
    feed(d, z)
    torch.testing.assert_close(d.embeddings(), z[2:])


def test_spectrum_uses_only_the_window() -> None:
    d = Diagnostics(embed_dim=3, window=64)
    feed(d, 1000.0 * torch.randn(64, 3, generator=gen(15), dtype=F64))  # pushed out below
    recent = torch.randn(64, 3, generator=gen(16), dtype=F64) * torch.tensor([2.0, 1.0, 0.5], dtype=F64)
    feed(d, recent[:30])
    feed(d, recent[30:])
    torch.testing.assert_close(d.spectrum(), covariance_spectrum(recent), rtol=1e-12, atol=1e-12)
    summary = d.summary()
    assert summary["spectrum"] == pytest.approx(covariance_spectrum(recent).tolist(), rel=1e-12)
    assert summary["effective_dim"] == pytest.approx(participation_ratio(covariance_spectrum(recent)))


@pytest.mark.parametrize("seen", [0, 1])
def test_spectrum_with_fewer_than_two_embeddings_is_zero(seen: int) -> None:
    d = Diagnostics(embed_dim=3, window=8)
    if seen:
        feed(d, torch.ones(1, 3, dtype=F64))
    torch.testing.assert_close(d.spectrum(), torch.zeros(3, dtype=F64))
    summary = d.summary(model=RJEPA(tiny_cfg(embed_dim=3)))
    assert summary["effective_dim"] == 0.0 and summary["embeddings_seen"] == seen
    assert "theorem1_cosine" not in summary  # needs a covariance, i.e. two embeddings


def test_h_norm_and_radius_are_from_the_last_tick() -> None:
    d = Diagnostics(embed_dim=2, window=8)
    feed(d, torch.zeros(2, 2), h=torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 4.0]]), radius=0.9)
    feed(d, torch.zeros(2, 2), h=torch.tensor([[1.0, 2.0, 2.0], [0.0, 6.0, 8.0]]), radius=0.25)
    assert d.h_norm == pytest.approx(6.5)  # mean of 3 and 10
    assert d.max_trace_radius == 0.25
    summary = d.summary()
    assert summary["h_norm"] == pytest.approx(6.5) and summary["max_trace_radius"] == 0.25


def test_repeat_errors_are_averaged_by_step() -> None:
    d = Diagnostics(embed_dim=2, window=8, max_step=3)
    z = torch.zeros(3, 2)
    d.observe(
        torch.tensor([1, 2, 5]),
        torch.tensor([math.nan, 0.2, 0.4]),
        z,
        z,
        0.0,
        torch.tensor([math.nan, 0.5, 0.7]),
    )
    d.observe(
        torch.tensor([2, 3, 6]), torch.tensor([0.1, 0.3, 0.6]), z, z, 0.0, torch.tensor([0.3, 0.6, 0.9])
    )
    assert d.repeat_error_by_step() == {2: pytest.approx(0.4), 3: pytest.approx((0.7 + 0.6 + 0.9) / 3)}
    assert d.summary()["repeat_error_by_step"] == d.repeat_error_by_step()


# --- Diagnostics.summary with a model: Theorem 1 -----------------------------------------------------
def tiny_cfg(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(trunk="none", in_features=8, n_units=6, embed_dim=4, pred_hidden=5)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def window_with_cov(d: Diagnostics) -> torch.Tensor:
    """Fill a window with anisotropic correlated embeddings; return their sample covariance (D, D)."""
    z = samples(with_spectrum([3.0, 1.0, 0.4, 0.1], seed=17), n=200, seed=18, mean=0.5)
    feed(d, z)
    return sample_cov(d.embeddings())


def test_summary_theorem1_with_linear_predictor_built_from_the_covariance() -> None:
    d = Diagnostics(embed_dim=4, window=128)
    cov = window_with_cov(d)
    model = RJEPA(tiny_cfg(predictor="linear")).to_device(torch.device("cpu"), F64)
    with torch.no_grad():
        model.G.weight.copy_(2.0 * psd_sqrt(cov))  # G^T G = 4 Σ_z
    summary = d.summary(model)
    assert summary["theorem1_cosine"] == pytest.approx(1.0, abs=1e-10)
    assert summary["cov_offdiag"] == pytest.approx(offdiag_mass(cov), rel=1e-10)
    assert summary["gtg_offdiag"] == pytest.approx(offdiag_mass(cov), rel=1e-8)
    with torch.no_grad():
        model.G.weight.copy_(torch.eye(4, dtype=F64) + 0.1 * torch.randn(4, 4, generator=gen(19), dtype=F64))
    assert d.summary(model)["theorem1_cosine"] < 0.9


def test_summary_theorem1_linearises_an_mlp_predictor_at_the_mean() -> None:
    d = Diagnostics(embed_dim=4, window=128)
    cov = window_with_cov(d)
    model = RJEPA(tiny_cfg(predictor="mlp")).to_device(torch.device("cpu"), F64)
    g1, g2 = model.G[0], model.G[2]
    with torch.no_grad():  # the 4 first hidden units copy z (always active); the fifth is always off
        g1.weight.zero_()
        g1.weight[:4].copy_(torch.eye(4, dtype=F64))
        g1.bias.copy_(torch.tensor([50.0] * 4 + [-1.0], dtype=F64))
        g2.weight.copy_(torch.cat([psd_sqrt(cov), torch.full((4, 1), 7.0, dtype=F64)], 1))
    with torch.no_grad():  # the service may call summary() inside no_grad; the Jacobian must still work
        summary = d.summary(model)
    assert summary["theorem1_cosine"] == pytest.approx(1.0, abs=1e-10)


# --- a tiny learner with hand-set gains --------------------------------------------------------------
def test_learner_reports_h_norm_and_largest_trace_radius() -> None:
    cfg = tiny_cfg(input_norm=False, optimizer="sgd", lr=0.0, embed_from="state")
    learner = RFPLearner(cfg, dtype=F64)
    rgc = learner.model.rgc
    b = torch.tensor([0.5, -1.0, 2.0, 0.1, -0.3, 1.5], dtype=F64)
    w = torch.tensor(
        [
            [0.1, 2.5, 0.2, 0.0, 0.3, 0.1],  # hh
            [0.2, 0.1, -0.1, 0.4, 0.0, 0.2],  # ch
            [0.3, -0.2, 0.1, 0.1, 0.5, 0.0],  # hc
            [0.2, 0.1, 0.4, 0.3, 0.1, 0.5],  # cc
        ],
        dtype=F64,
    )
    with torch.no_grad():  # W = 0: the drive is x = b whatever the input, so h and c are known by hand
        rgc.W.zero_()
        rgc.b.copy_(b)
        rgc.gains.copy_(w)
    u = torch.randn(2, 8, generator=gen(20), dtype=F64)
    diag = learner.diagnostics

    def largest_radius(h: torch.Tensor, c: torch.Tensor) -> float:
        """Reference: each unit's 2x2 block of the autograd Jacobian of one step, its eigenvalues."""

        def step(hc: torch.Tensor) -> torch.Tensor:
            h1, c1 = rgc_forward(learner.model, u[:1], hc[None, 0], hc[None, 1])
            return torch.stack([h1[0], c1[0]])

        jac = torch.autograd.functional.jacobian(step, torch.stack([h, c]))  # (2, N, 2, N)
        n = h.shape[0]
        blocks = torch.stack([jac[:, i, :, i] for i in range(n)])  # (N, 2, 2)
        return float(torch.linalg.eigvals(blocks).abs().max())

    zero = torch.zeros(6, dtype=F64)
    learner.tick_features(["a", "b"], u)  # h0 = c0 = 0, so h1 = c1 = x = b
    assert diag.h_norm == pytest.approx(float(b.norm()), rel=1e-12)
    step1 = largest_radius(zero, zero)
    # at h0 = c0 = 0 each block is [[0, -b w_ch], [-b w_hc, 0]]: radius |b| sqrt(|w_ch w_hc|)
    assert step1 == pytest.approx(float((b.abs() * (w[1] * w[2]).abs().sqrt()).max()), rel=1e-9)
    assert diag.max_trace_radius == pytest.approx(step1, rel=1e-9)
    assert diag.error_by_step() == {}  # nothing scored at the first fixation

    out = learner.tick_features(["a", "b"], u)
    h2 = (1 - torch.tanh(w[1] * b)) * b + torch.tanh(w[0] * b) * b  # form R with h1 = c1 = b
    assert diag.h_norm == pytest.approx(float(h2.norm()), rel=1e-12)
    assert diag.max_trace_radius == pytest.approx(largest_radius(b, b), rel=1e-9)
    assert diag.error_by_step() == {2: pytest.approx(float(out.error.mean()), rel=1e-12)}
    with torch.no_grad():
        z2 = learner.model.embed(u, h2.expand(2, -1))  # (2, D)
    torch.testing.assert_close(diag.embeddings()[-2:], z2, rtol=1e-12, atol=1e-12)
    summary = diag.summary(learner.model)
    assert summary["embeddings_seen"] == 4 and -1.0 <= summary["theorem1_cosine"] <= 1.0


def test_non_finite_embeddings_are_left_out_and_counted() -> None:
    # one diverged stream (NaN or inf embedding) must not break the spectrum of the others
    d = Diagnostics(3, window=8)
    z = torch.randn(5, 3, dtype=torch.float64)
    z[2, 1] = float("nan")
    z[4, 0] = float("inf")
    d.observe(torch.ones(5, dtype=torch.long), torch.full((5,), 0.1), z, torch.zeros(5, 2))
    summary = d.summary()
    assert summary["nonfinite_embeddings"] == 2 and summary["embeddings_seen"] == 5
    assert torch.equal(d.embeddings(), z[[0, 1, 3]])
    assert math.isfinite(summary["effective_dim"]) and summary["effective_dim"] >= 1.0


def test_embeddings_seen_counts_a_batch_larger_than_the_window() -> None:
    d = Diagnostics(3, window=4)
    z = torch.randn(6, 3, dtype=torch.float64)
    d.observe(torch.ones(6, dtype=torch.long), torch.full((6,), 0.1), z, torch.zeros(6, 2))
    assert d.summary()["embeddings_seen"] == 6
    assert torch.equal(d.embeddings(), z[2:])
