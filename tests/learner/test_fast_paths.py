"""The learners' fast paths against the plain computations they replace: bit for bit, or to rounding."""

from __future__ import annotations

import pytest
import torch

from learner import ModelConfig, RFPLearner
from learner.errors import ConfigError
from learner.kernels import FusedAdamStep, advance_w_traces, mix
from learner.rgc import RGC
from learner.whitening import RunningWhitening

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_direct_fused_adam_step_is_bit_identical_to_optimizer_step(dtype: torch.dtype) -> None:
    shapes = [(6, 5), (6,), (4, 6)]

    def make() -> tuple[list[torch.nn.Parameter], torch.optim.Adam]:
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen(i), dtype=dtype)) for i, s in enumerate(shapes)]
        groups = [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}]
        return ps, torch.optim.Adam(groups, lr=1e-2, weight_decay=1e-3, fused=True)

    ref_params, ref_opt = make()
    params, opt = make()
    direct = None
    for t in range(6):
        for ps in (ref_params, params):
            for i, p in enumerate(ps):
                p.grad = torch.randn(p.shape, generator=gen(100 * t + i), dtype=dtype)
        if t == 3:  # a learning rate set on the groups (as checkpoint loading does) applies
            for o in (ref_opt, opt):
                o.param_groups[0]["lr"] = 3e-3
        ref_opt.step()
        if direct is None:
            opt.step()
            direct = FusedAdamStep.for_optimizer(opt)
            assert direct is not None
        else:
            direct()
        for p, q in zip(ref_params, params, strict=True):
            assert torch.equal(p, q)
    for p, q in zip(ref_params, params, strict=True):
        assert torch.equal(ref_opt.state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"])
        assert torch.equal(ref_opt.state[p]["step"], opt.state[q]["step"])


def test_direct_step_declines_what_it_does_not_replicate() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    for opt in (
        torch.optim.Adam([p], amsgrad=True, fused=True),
        torch.optim.Adam([p], fused=False),
        torch.optim.SGD([p], lr=0.1),
    ):
        opt.step()
        assert FusedAdamStep.for_optimizer(opt) is None
    assert FusedAdamStep.for_optimizer(torch.optim.Adam([p], fused=True)) is None  # no state yet


def test_learner_with_the_direct_step_matches_one_without(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ModelConfig(trunk="none", in_features=12, n_units=10, embed_dim=6, pred_hidden=9, lr=1e-2)
    fast = RFPLearner(cfg)
    with monkeypatch.context() as m:
        m.setattr(FusedAdamStep, "for_optimizer", classmethod(lambda cls, opt: None))
        slow = RFPLearner(cfg)
        feats = torch.randn(20, 3, 12, generator=gen(1))
        for x in feats:
            slow.tick_features(["a", "b", "c"], x)
    assert slow._direct_step is None
    for x in feats:
        fast.tick_features(["a", "b", "c"], x)
    assert fast._direct_step is not None
    for (name, p), q in zip(fast.model.named_parameters(), slow.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_fixed_embedding_gets_no_gradient_and_the_rest_learns_alike() -> None:
    """embed_lr_scale 0: E has no .grad and never moves, and every other weight follows exactly the
    trajectory of a learner whose E learns through Adam at a zero learning rate."""
    base = dict(trunk="none", in_features=12, n_units=10, embed_dim=6, pred_hidden=9, lr=1e-2, seed=3)
    frozen = RFPLearner(ModelConfig(**base, embed_lr_scale=0.0))
    other = RFPLearner(ModelConfig(**base, embed_lr_scale=1.0))
    for group in other.optimizer.param_groups[2:]:  # E's group
        group["lr"] = 0.0
    e0 = frozen.model.E.weight.clone()
    feats = torch.randn(60, 2, 12, generator=gen(4))
    for x in feats:
        frozen.tick_features(["a", "b"], x)
        other.tick_features(["a", "b"], x)
    assert frozen.model.E.weight.grad is None and "E.weight" not in frozen.grads()
    assert other.model.E.weight.grad is not None
    assert torch.equal(frozen.model.E.weight, e0)
    assert frozen.updates_applied > 30  # past whitened_mse's warm-up
    for (name, p), q in zip(frozen.model.named_parameters(), other.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_the_trace_kernels_equal_their_plain_forms() -> None:
    """learner.kernels.mix and advance_w_traces (both paths) against the einsums of their docstrings."""
    b, n, k1, s = 3, 5, 7, 6
    g = gen(8)
    a = torch.randn(b, n, 2, 2, generator=g, dtype=F64)
    p = torch.randn(b, 2, n, k1, generator=g, dtype=F64)
    assert torch.allclose(mix(p, a), torch.einsum("bnij,bjnx->binx", a, p), rtol=0, atol=1e-13)
    trace = torch.randn(s, 2, n, k1, generator=g, dtype=F64)
    slots, idx = torch.tensor([4, 0, 2]), torch.tensor([0, 2])  # rows 0 and 2 of the tick scored
    delta = torch.randn(2, n, generator=g, dtype=F64)
    kk = torch.randn(b, 2, n, generator=g, dtype=F64)
    v1 = torch.randn(b, k1, generator=g, dtype=F64)
    old = trace[slots]
    g_plain = torch.einsum("bn,bnm->nm", delta, old[idx, 0])
    t_plain = torch.einsum("bnij,bjnx->binx", a, old) + kk[..., None] * v1[:, None, None, :]
    for batched in (False, True):
        t = trace.clone()
        w_grad, b_grad = torch.zeros(n, k1 - 1, dtype=F64), torch.zeros(n, dtype=F64)
        scratch = torch.empty(n, 2, k1, dtype=F64)
        advance_w_traces(t, slots, idx, delta, a, kk, v1, w_grad, b_grad, scratch, batched=batched)
        assert torch.allclose(w_grad, g_plain[:, :-1], rtol=0, atol=1e-12), batched
        assert torch.allclose(b_grad, g_plain[:, -1], rtol=0, atol=1e-12), batched
        assert torch.allclose(t[slots], t_plain, rtol=0, atol=1e-12), batched
        assert torch.equal(t[[1, 3, 5]], trace[[1, 3, 5]])  # other slots untouched


def _immediate(xs: list[torch.Tensor], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The running statistics updated at every batch, as written in RunningWhitening's docstring."""
    f = xs[0].shape[1]
    mean, cov, n = torch.zeros(f, dtype=F64), torch.eye(f, dtype=F64), 0
    for x in xs:
        n += x.shape[0]
        w = max(x.shape[0] / n, x.shape[0] / window)
        mean = mean + w * (x.mean(0) - mean)
        d = x - mean
        cov = (1 - w) * cov + w / x.shape[0] * d.T @ d
    return mean, cov


def test_lazy_covariance_equals_the_immediate_update() -> None:
    sizes = [1, 3, 1, 70, 1, 1, 5, 64, 2] * 3 + [1] * 150  # first batch, large batches, buffer wraps
    xs = [torch.randn(b, 16, generator=gen(i), dtype=F64) * 2 + 1 for i, b in enumerate(sizes)]
    norm = RunningWhitening(16, window=50, every=1000).double()  # no recompute: cov is only flushed
    for x in xs:
        norm.observe(x)
    mean, cov = _immediate(xs, window=50)
    assert torch.allclose(norm.mean, mean, rtol=0, atol=1e-12)
    assert torch.allclose(norm.covariance(), cov, rtol=0, atol=1e-12)
    pending = norm._pending
    sd = norm.state_dict()  # saves cov and the pending rows as they are: folding would change rounding
    assert pending and norm._pending == pending and sd["_extra_state"]["rows"].shape == (pending, 16)
    assert sd["count"].item() == sum(sizes) and sd["updates"].item() == len(sizes)
    again = RunningWhitening(16, window=50, every=1000).double()
    again.load_state_dict(sd)
    assert torch.equal(again.covariance(), norm.covariance())


def test_whitening_whitens_and_state_dict_resumes_bit_identically() -> None:
    mix = torch.eye(8) + 0.3 * torch.randn(8, 8, generator=gen(2))  # well conditioned: shrinkage is small
    xs = list((torch.randn(3000, 8, generator=gen(10)) @ mix + 3).split(1))
    a = RunningWhitening(8, window=2000, every=64)
    for x in xs[:333]:
        a.observe(x)
    b = RunningWhitening(8, window=2000, every=64)
    b.load_state_dict(a.state_dict())
    for x in xs[333:]:
        a.observe(x)
        b.observe(x)
    for name, t in a.state_dict().items():
        if name == "_extra_state":  # the pending covariance rows
            assert all(torch.equal(v, b.state_dict()[name][k]) for k, v in t.items())
        else:
            assert torch.equal(t, b.state_dict()[name]), name
    s = a.transform(torch.cat(xs))
    # whitened by its own statistics: eigenvalues lam / (lam + shrink), the shrinkage (1% of the mean
    # variance) pulls the smallest below 1
    evals = torch.linalg.eigvalsh(torch.cov(s.T))
    assert evals.min() > 0.6 and evals.max() < 1.05, evals  # the smallest variance is about 0.04 here
    assert torch.linalg.eigvalsh(torch.cov(torch.cat(xs).T)).max() > 2  # it was far from white


@pytest.mark.parametrize("phi", ["identity", "tanh"])
@pytest.mark.parametrize("gate_bias", [False, True])
def test_stacked_jacobian_matches_autograd(phi: str, gate_bias: bool) -> None:
    n, m, b = 5, 4, 3
    rgc = RGC(m, n, phi=phi, gate_bias=gate_bias, init_scale=0.8, generator=gen(4)).double()
    if rgc.biases is not None:
        with torch.no_grad():
            rgc.biases.normal_(0, 0.5, generator=gen(5))
    u, h, c = (torch.randn(b, k, generator=gen(6 + i), dtype=F64) for i, k in enumerate((m, n, n)))
    _, _, cache = rgc.step(u, h, c)
    jac = rgc.jacobian(cache)
    vec = [rgc.gains] + ([rgc.biases] if rgc.biases is not None else [])
    for i in range(b):  # autograd, one stream at a time: d(h_t, c_t) / d(h_{t-1}, c_{t-1}, b, gains, biases)
        hp, cp = h[i : i + 1].clone().requires_grad_(), c[i : i + 1].clone().requires_grad_()
        hn, cn, _ = rgc.step(u[i : i + 1], hp, cp)
        rows = []
        for out in (hn[0], cn[0]):  # (N,) each
            per_unit = []
            for j in range(n):
                g = torch.autograd.grad(out[j], [hp, cp, rgc.b, *vec], retain_graph=True, allow_unused=True)
                per_unit.append([x[..., j] if x is not None else torch.zeros(()) for x in g])
            rows.append(per_unit)
        for j in range(n):  # a[j] = [[dh/dh, dh/dc], [dc/dh, dc/dc]] of unit j
            a_ref = torch.tensor([[float(rows[r][j][s][0]) for s in (0, 1)] for r in (0, 1)], dtype=F64)
            assert torch.allclose(jac.a[i, j], a_ref, atol=1e-12)
            k_ref = torch.tensor([float(rows[r][j][2]) for r in (0, 1)], dtype=F64)
            assert torch.allclose(jac.k[i, :, j], k_ref, atol=1e-12)
            imm_ref = torch.stack([torch.cat([g.reshape(-1) for g in rows[r][j][3:]]) for r in (0, 1)])
            assert torch.allclose(jac.imm[i, :, j], imm_ref, atol=1e-12)


@pytest.mark.parametrize("sample_shrink", [True, False])
def test_whitening_shrinks_by_the_documented_amount(sample_shrink: bool) -> None:
    """Whitened covariance = C (C + s I)^-1 in C's eigenbasis, s = ratio * mean variance, where the
    ratio is ``shrink`` alone, or at least F / (n + 1) with ``sample_shrink``."""
    f, n = 6, 40
    x = torch.randn(n, f, generator=gen(3), dtype=F64) * torch.tensor([3.0, 1, 1, 0.5, 0.1, 0.01], dtype=F64)
    norm = RunningWhitening(f, window=10_000, every=n, shrink=0.02, sample_shrink=sample_shrink).double()
    norm.observe(x)  # one batch: the statistics are its mean and biased covariance; recomputed (n_batches 1)
    d = x - x.mean(0)
    cov = d.T @ d / n
    evals = torch.linalg.eigvalsh(cov)
    ratio = max(0.02, f / (n + 1)) if sample_shrink else 0.02
    expected = evals / (evals + ratio * cov.diagonal().mean())
    got = torch.linalg.eigvalsh(norm.whiten @ cov @ norm.whiten)
    assert torch.allclose(got, expected, atol=1e-10)


def test_loading_a_live_learners_state_leaves_the_two_apart() -> None:
    cfg = ModelConfig(
        trunk="none", in_features=12, n_units=10, embed_dim=6, pred_hidden=9, lr=1e-2, loss="cosine"
    )
    a, b = RFPLearner(cfg), RFPLearner(cfg)
    feats = torch.randn(6, 2, 12, generator=gen(7))
    for x in feats[:3]:
        a.tick_features(["s", "t"], x)
    b.load_state_dict(a.state_dict())
    before = {k: v.clone() for k, v in a.optimizer.state_dict()["state"][0].items()}
    for x in feats[3:]:
        b.tick_features(["s", "t"], x)
    after = a.optimizer.state_dict()["state"][0]
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # b's steps did not move a's moments
    assert not torch.equal(b.optimizer.state_dict()["state"][0]["exp_avg"], before["exp_avg"])


def test_a_wide_whitening_is_diagonal_until_it_has_more_samples_than_features() -> None:
    """RunningWhitening wider than DIAGONAL_BELOW skips the eigendecomposition while n < F."""
    from learner.whitening import RunningWhitening

    f = RunningWhitening.DIAGONAL_BELOW + 8
    w = RunningWhitening(f, every=4)
    x = torch.randn(4, f, generator=gen(3)) * torch.linspace(0.5, 3.0, f)  # recomputed at 1, 2, 4
    for row in x:
        w.observe(row[None])
    whiten = w.whiten
    assert torch.equal(whiten, torch.diag(whiten.diagonal()))  # no off-diagonal terms
    shrink = f / (w.n_seen + 1) * float(w.cov.diagonal().mean())
    torch.testing.assert_close(whiten.diagonal(), (w.cov.diagonal() + shrink).rsqrt())
    narrow = RunningWhitening(16, every=4)
    for row in torch.randn(6, 16, generator=gen(4)):
        narrow.observe(row[None])
    assert not torch.equal(narrow.whiten, torch.diag(narrow.whiten.diagonal()))  # full ZCA there


@pytest.mark.parametrize("loss", ["cosine", "mse", "whitened_mse"])
@pytest.mark.parametrize("predictor", ["residual", "mlp"])
def test_the_hand_written_head_equals_autograd(loss: str, predictor: str) -> None:
    """RFPLearner(head="hand") and head="autograd" learn the same weights, tick by tick (float64):
    the same scores, the same delta into area 6, the same gradients of E and G."""
    cfg = ModelConfig(
        trunk="none", in_features=12, n_units=10, embed_dim=6, pred_hidden=9, lr=1e-2, loss=loss,
        predictor=predictor, embed_lr_scale=1.0, seed=5,
    )  # fmt: skip
    by_hand = RFPLearner(cfg, dtype=F64, head="hand")
    by_autograd = RFPLearner(cfg, dtype=F64, head="autograd")
    assert by_hand._head is not None and by_autograd._head is None
    feats = torch.randn(60, 3, 12, generator=gen(6), dtype=F64)
    for x in feats:
        a = by_hand.tick_features(["a", "b", "c"], x)
        b = by_autograd.tick_features(["a", "b", "c"], x)
        assert torch.allclose(a.error, b.error, rtol=1e-10, atol=1e-12, equal_nan=True)
    assert by_hand.updates_applied > 30
    for (name, p), q in zip(by_hand.model.named_parameters(), by_autograd.model.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12), name


def test_the_head_choice_is_explicit() -> None:
    cfg = ModelConfig(trunk="none", in_features=8, n_units=6, embed_dim=4, pred_hidden=5, predictor="linear")
    assert RFPLearner(cfg)._head is None  # auto: the linear predictor goes through autograd
    with pytest.raises(ConfigError, match="hand-written head"):
        RFPLearner(cfg, head="hand")
    with pytest.raises(ConfigError, match="head must be"):
        RFPLearner(cfg, head="fast")
