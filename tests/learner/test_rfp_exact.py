"""RFP against autograd BPTT, in float64, for every parameter group (spec section 3)."""

from __future__ import annotations

import pytest
import torch

from learner import ModelConfig, RFPLearner
from learner.rgc import RGC
from tests.learner.reference import (
    bptt_grads,
    embed,
    rel_errors,
    rgc_forward,
    smaller_norms,
    split_groups,
)

M, N, D, H, T, B = 12, 10, 6, 9, 24, 3
TOL = 1e-9


def make_learner(
    *,
    loss: str,
    phi: str,
    weights: str,
    seed: int = 0,
    batched: bool = False,
    head: str = "mlp",
    embed_from: str = "context",
    rgc_inputs: int = 0,
    preview: int = 0,
    input_norm: bool = False,
    embed_pcs: int = 0,
    embed_state_scale: float = 1.0,
) -> RFPLearner:
    """``head``: ``mlp`` (the spec's predictor, no context whitening), or ``default`` (the residual
    predictor and the context whitening of ModelConfig's defaults, with random non-trivial weights and
    statistics held fixed, since RFP treats them as constants of each step). ``embed_from``: the
    embedding reads the context list [u; s(h)] (the default) or the state alone. ``rgc_inputs``: area 6
    reads a fixed random projection of u to that many inputs (0: all of u). ``preview``: the predictor
    also reads a preview of that width per fixation, whitened by fixed random statistics.
    ``input_norm``: the trunk features are whitened first, by fixed random statistics.
    ``embed_pcs``, ``embed_state_scale``: the embedding reads u projected on a fixed random
    orthonormal basis of that many columns (the input whitening held at the identity) and A s(h)."""
    cfg = ModelConfig(
        predictor="mlp" if head == "mlp" else "residual",
        context_norm=head != "mlp",
        embed_from=embed_from,
        trunk="none",
        in_features=M,
        n_units=N,
        rgc_inputs=rgc_inputs,
        preview_features=preview,
        embed_dim=D,
        pred_hidden=H,
        loss=loss,
        phi=phi,
        gate_bias=weights == "random",
        input_norm=input_norm or embed_pcs > 0,
        embed_pcs=embed_pcs,
        embed_state_scale=embed_state_scale,
        update_mode="segment",
        segment_len=0,
        optimizer="sgd",
        lr=0.0,
        embed_lr_scale=1.0,  # E learns, so its gradient is computed and checked
        seed=seed,
    )
    learner = RFPLearner(cfg, dtype=torch.float64, batched_traces=batched)
    if weights == "random":  # spec 3.1: gains N(0, 0.7^2), gate biases N(0, 0.3^2)
        gen = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            learner.model.rgc.gains.copy_(torch.randn(4, N, generator=gen, dtype=torch.float64) * 0.7)
            learner.model.rgc.biases.copy_(torch.randn(4, N, generator=gen, dtype=torch.float64) * 0.3)
    if head != "mlp":
        model = learner.model
        gen = torch.Generator().manual_seed(200 + seed)
        with torch.no_grad():  # the zero-initialised output layer would hide G1's gradient
            model.G.lin2.weight.copy_(torch.randn(D, H, generator=gen, dtype=torch.float64) * 0.3)
            model.G.lin2.bias.copy_(torch.randn(D, generator=gen, dtype=torch.float64) * 0.1)
            model.context_norm.mean.copy_(torch.randn(N, generator=gen, dtype=torch.float64) * 0.5)
            q = torch.randn(N, N, generator=gen, dtype=torch.float64)
            model.context_norm.whiten.copy_(
                torch.eye(N, dtype=torch.float64) + 0.3 * q
            )  # not symmetric: W vs W^T shows
        model.observe_context = lambda h: None  # type: ignore[method-assign]
    if preview:  # random fixed preview statistics: RFP treats them as constants, like the context's
        norm = learner.model.preview_norm
        gen = torch.Generator().manual_seed(400 + seed)
        with torch.no_grad():
            norm.mean.copy_(torch.randn(preview, generator=gen, dtype=torch.float64) * 0.5)
            q = torch.randn(preview, preview, generator=gen, dtype=torch.float64)
            norm.whiten.copy_(torch.eye(preview, dtype=torch.float64) + 0.3 * q)  # not symmetric
        norm.observe = lambda x: None  # type: ignore[method-assign]
        with torch.no_grad():  # Q starts at zero, which would hide the preview's forward pass
            learner.model.Q.weight.copy_(torch.randn(H, preview, generator=gen, dtype=torch.float64) * 0.3)
    if input_norm:  # random fixed input statistics: every step reads them as constants
        norm = learner.model.input_norm
        gen = torch.Generator().manual_seed(500 + seed)
        with torch.no_grad():
            norm.mean.copy_(torch.randn(M, generator=gen, dtype=torch.float64) * 0.5)
            q = torch.randn(M, M, generator=gen, dtype=torch.float64)
            norm.whiten.copy_(torch.eye(M, dtype=torch.float64) + 0.3 * q)  # not symmetric
        norm.observe = lambda x: None  # type: ignore[method-assign]
    if embed_pcs:  # the input whitening at the identity, its basis random and fixed
        norm = learner.model.input_norm
        gen = torch.Generator().manual_seed(500 + seed)
        with torch.no_grad():
            basis, _ = torch.linalg.qr(torch.randn(M, embed_pcs, generator=gen, dtype=torch.float64))
            norm.basis.copy_(basis)
        norm.observe = lambda x: None  # type: ignore[method-assign]
    if loss == "whitened_mse":  # a random fixed metric: RFP treats it as a constant of each step
        gen = torch.Generator().manual_seed(300 + seed)
        q = torch.randn(D, D, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            learner.model.change_norm.whiten.copy_(
                torch.eye(D, dtype=torch.float64) + 0.4 * q
            )  # not symmetric
        learner.model.change_norm.n_seen = 4 * D  # a metric that has seen enough changes: its whitening
        learner.model.change_sq.copy_(torch.tensor([1.0, 100.0]))  # ready (RJEPA.metric_ready)
        learner.model.observe_change = lambda scores: None  # type: ignore[method-assign]
    return learner


def inputs(seed: int, batch: int = B, steps: int = T) -> torch.Tensor:
    return torch.randn(batch, steps, M, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_rfp(
    learner: RFPLearner, u: torch.Tensor, previews: torch.Tensor | None = None
) -> tuple[dict, list[dict]]:
    """Feed u (B, T, M) (and previews (B, T, F)) as B lockstep streams; return summed and per-step
    gradients (times B: sums)."""
    ids = [f"s{i}" for i in range(u.shape[0])]
    per_step, prev = [], None
    for t in range(u.shape[1]):
        learner.tick_features(ids, u[:, t], preview=previews[:, t] if previews is not None else None)
        now = learner.grads()
        if t >= 1:
            per_step.append({n: now[n] - (prev[n] if prev else 0) for n in now})
        prev = now
    return learner.grads(), per_step


CASES = (
    [
        (loss, phi, weights, "mlp", "context")
        for loss in ("cosine", "mse")
        for phi in ("identity", "tanh")
        for weights in ("zero", "random")
    ]
    + [(loss, "identity", "random", "default", "context") for loss in ("cosine", "mse")]
    + [("cosine", "tanh", "random", head, "state") for head in ("mlp", "default")]
    + [
        ("whitened_mse", phi, "random", head, "context")
        for phi, head in (("tanh", "mlp"), ("identity", "default"))
    ]
)


@pytest.mark.parametrize("loss,phi,weights,head,embed_from", CASES)
def test_rfp_equals_bptt_for_every_group(
    loss: str, phi: str, weights: str, head: str, embed_from: str
) -> None:
    learner = make_learner(loss=loss, phi=phi, weights=weights, head=head, embed_from=embed_from)
    assert_exact(learner, head=head, weights=weights)


@pytest.mark.parametrize("batched", [False, True])
def test_rfp_exact_when_area_6_reads_a_projection_of_u(batched: bool) -> None:
    """With ``rgc_inputs`` < M the traces are of the projected inputs P^T u (K + 1 wide), while the
    embedding reads all of u; the reference projects on its own (a trace of u instead fails)."""
    learner = make_learner(
        loss="whitened_mse", phi="tanh", weights="random", head="default", rgc_inputs=5, batched=batched
    )
    assert learner.model.rgc.W.shape == (N, 5) and learner.states.trace_shapes["W"] == (2, N, 6)
    assert_exact(learner, head="default", weights="random")


@pytest.mark.parametrize("head", ["mlp", "default"])
def test_rfp_exact_with_a_preview_input(head: str) -> None:
    """The predictor also reads a preview of each fixation (``preview_features``): Q's gradient and
    every RFP group still equal BPTT's, with the hand head and with autograd's."""
    for impl in ("hand", "autograd"):
        learner = make_learner(loss="whitened_mse", phi="tanh", weights="random", head=head, preview=5)
        learner._head = None if impl == "autograd" else learner._head
        previews = torch.randn(B, T, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        assert_exact(learner, head=head, weights="random", previews=previews)


@pytest.mark.parametrize("head", ["mlp", "default"])
def test_rfp_exact_when_the_trunk_features_are_whitened(head: str) -> None:
    """``input_norm`` (the default): area 6, its traces and the embedding all read the whitened
    features; the hand head and autograd's."""
    for impl in ("hand", "autograd"):
        learner = make_learner(loss="whitened_mse", phi="tanh", weights="random", head=head, input_norm=True)
        learner._head = None if impl == "autograd" else learner._head
        assert_exact(learner, head=head, weights="random")


@pytest.mark.parametrize("embed_pcs,scale", [(3, 1.0), (3, 0.3), (0, 0.3)])
def test_rfp_exact_when_the_embedding_reads_top_components_and_a_scaled_state(
    embed_pcs: int, scale: float
) -> None:
    """``embed_pcs`` (z = E [u V; s]) and ``embed_state_scale`` (z = E [u; A s]): E's gradient
    and every RFP group still equal BPTT's; the reference writes both out on its own."""
    learner = make_learner(
        loss="whitened_mse",
        phi="tanh",
        weights="random",
        head="default",
        embed_pcs=embed_pcs,
        embed_state_scale=scale,
    )
    assert learner.model.E.weight.shape[1] == (embed_pcs or M) + N
    assert_exact(learner, head="default", weights="random")


def assert_exact(
    learner: RFPLearner, *, head: str, weights: str, previews: torch.Tensor | None = None
) -> None:
    """RFP's summed and per-step gradients of every group equal the float64 BPTT reference."""
    u = inputs(1)
    norm = learner.model.input_norm  # the reference reads the whitened features, written out again
    u_ref = u if norm is None else (u - norm.mean) @ norm.whiten
    ref_sum, ref_steps = bptt_grads(learner.model, u_ref, previews=previews)
    got_sum, got_steps = run_rfp(learner, u, previews)
    errors = rel_errors(split_groups(got_sum), split_groups(ref_sum))
    groups = set(errors)
    assert {"rgc.W", "rgc.b", "w_hh", "w_ch", "w_hc", "w_cc", "E.weight"} <= groups
    if previews is not None:
        assert "Q.weight" in groups and float(ref_sum["Q.weight"].abs().max()) > 1e-6
    if head != "mlp":
        assert {"G.lin1.weight", "G.lin1.bias", "G.lin2.weight", "G.lin2.bias"} <= groups
    if weights == "random":
        assert {"beta_hh", "beta_ch", "beta_hc", "beta_cc"} <= groups
    worst = max(max(e) for e in errors.values())
    assert worst <= TOL, errors
    for t, (got, ref) in enumerate(zip(got_steps, ref_steps, strict=True)):  # lag bugs show up here
        step_err = rel_errors(split_groups(got), split_groups(ref))
        assert max(max(e) for e in step_err.values()) <= TOL, (t, step_err)
    # the test would see a wrong gradient: the RGC gradients are far from zero
    assert float(ref_sum["rgc.gains"].abs().max()) > 1e-6


def test_batched_trace_path_equals_per_stream_path() -> None:
    a = make_learner(loss="cosine", phi="tanh", weights="random", batched=False)
    b = make_learner(loss="cosine", phi="tanh", weights="random", batched=True)
    u = inputs(2)
    ga, _ = run_rfp(a, u)
    gb, _ = run_rfp(b, u)
    assert max(max(e) for e in rel_errors(ga, gb).values()) <= 1e-12


@pytest.mark.parametrize("loss", ["cosine", "whitened_mse"])
def test_skipped_rows_leave_the_mean_over_the_others(loss: str) -> None:
    """Rows below the norm floor are left out of each tick's mean (the mean is over the rest)."""
    learner = make_learner(loss=loss, phi="tanh", weights="random", head="default")
    u = inputs(11)
    norms = smaller_norms(learner.model, u)  # (T - 1, B)
    floor = float(norms.flatten().median())  # about half the rows skipped, at most steps some
    learner.cfg = learner.cfg.replace(min_norm=floor / D**0.5)
    learner.model.cfg = learner.cfg
    skipped_somewhere = bool((norms < floor).any(1).logical_and((norms >= floor).any(1)).any())
    assert skipped_somewhere  # a tick that mixes kept and skipped rows: the case under test
    ref_sum, ref_steps = bptt_grads(learner.model, u, floor=floor)
    got_sum, got_steps = run_rfp(learner, u)
    errors = rel_errors(split_groups(got_sum), split_groups(ref_sum))
    assert max(max(e) for e in errors.values()) <= TOL, errors
    for t, (got, ref) in enumerate(zip(got_steps, ref_steps, strict=True)):
        step_err = rel_errors(split_groups(got), split_groups(ref))
        assert max(max(e) for e in step_err.values()) <= TOL, (t, step_err)


def test_tick_gradient_is_mean_of_single_stream_gradients() -> None:
    u = inputs(3, batch=4, steps=6)
    together = make_learner(loss="mse", phi="identity", weights="random")
    g_together, _ = run_rfp(together, u)
    singles = []
    for i in range(4):
        alone = make_learner(loss="mse", phi="identity", weights="random")
        g_alone, _ = run_rfp(alone, u[i : i + 1])
        singles.append(g_alone)
    mean = {n: sum(s[n] for s in singles) / 4 for n in singles[0]}
    assert max(max(e) for e in rel_errors(g_together, mean).values()) <= 1e-12


def test_negative_control_full_recurrent_matrix_is_not_exact() -> None:
    """A full h->tau_h matrix breaks the block condition: the element-wise recursion is then far off."""
    learner = make_learner(loss="cosine", phi="identity", weights="random")
    k_full = torch.randn(N, N, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 0.7
    k_full.fill_diagonal_(0)

    class FullRecurrenceRGC(RGC):
        def step(self, u, h, c):  # type: ignore[no-untyped-def]
            _, _, cache = super().step(u, h, c)
            ref_h, ref_c = rgc_forward(learner.model, u, h, c, k_full)  # the true dynamics
            return ref_h, ref_c, cache  # ...with the element-wise Jacobian kept for the traces

    learner.model.rgc.__class__ = FullRecurrenceRGC
    u = inputs(4)
    got, _ = run_rfp(learner, u)
    learner.model.rgc.__class__ = RGC
    ref, _ = bptt_grads(learner.model, u, k_full=k_full)
    errors = rel_errors(split_groups(got), split_groups(ref))
    assert errors["w_hh"][0] > 1e-2 and errors["rgc.W"][0] > 1e-3, errors


def test_finite_differences_agree_with_rfp() -> None:
    """Central differences on a few entries; the target is frozen at the base parameters (stop-gradient)."""
    learner = make_learner(loss="cosine", phi="tanh", weights="random")
    u = inputs(5, batch=1, steps=12)
    got, _ = run_rfp(learner, u)
    model = learner.model

    def loss_with_frozen_targets(targets: list[torch.Tensor]) -> float:
        h = c = u.new_zeros(1, N)
        hs = []
        for t in range(u.shape[1]):
            h, c = rgc_forward(model, u[:, t], h, c)
            hs.append(h)
        total = 0.0
        for t in range(1, len(hs)):
            p = model.G(embed(model, u[:, t - 1], hs[t - 1]))
            z = targets[t]
            total += float(1 - torch.nn.functional.cosine_similarity(p, z, dim=-1).mean())
        return total

    with torch.no_grad():
        h = c = u.new_zeros(1, N)
        targets = []
        for t in range(u.shape[1]):
            h, c = rgc_forward(model, u[:, t], h, c)
            targets.append(embed(model, u[:, t], h).clone())
        eps = 1e-5
        params = dict(model.named_parameters())
        for name, index in [
            ("rgc.W", (1, 2)),
            ("rgc.b", (3,)),
            ("rgc.gains", (0, 4)),
            ("rgc.gains", (1, 2)),
            ("rgc.gains", (2, 7)),
            ("rgc.gains", (3, 1)),
            ("rgc.biases", (0, 5)),
            ("E.weight", (2, 3)),
        ]:
            p = params[name]
            old = float(p[index])
            p[index] = old + eps
            up = loss_with_frozen_targets(targets)
            p[index] = old - eps
            down = loss_with_frozen_targets(targets)
            p[index] = old
            fd = (up - down) / (2 * eps)
            g = float(got[name][index])
            assert abs(fd - g) / max(abs(g), 1.0) < 1e-6, (name, index, fd, g)


@pytest.mark.parametrize("phi", ["identity", "tanh"])
def test_passthrough_and_zero_weight_properties(phi: str) -> None:
    learner = make_learner(loss="cosine", phi=phi, weights="random")
    rgc = learner.model.rgc
    with torch.no_grad():
        rgc.biases.zero_()
        u = inputs(6, batch=2, steps=5)
        zero = u.new_zeros(2, N)
        h1, c1, _ = rgc.step(u[:, 0], zero, zero)
        expect = rgc.drive(u[:, 0])
        expect = torch.tanh(expect) if phi == "tanh" else expect
        assert torch.equal(h1, expect) and torch.equal(c1, expect)  # passthrough, random gains
        rgc.gains.zero_()
        h, c = zero, zero
        for t in range(5):
            h, c, _ = rgc.step(u[:, t], h, c)
            x = rgc.drive(u[:, t])
            assert torch.equal(h, torch.tanh(x) if phi == "tanh" else x)  # no temporal dynamics


def test_zero_weights_still_get_gradient() -> None:
    """Zero is not a stationary point of the recurrent gains (spec 1.3).

    At zero the gates that drive h~ (hh, ch) get a gradient in every unit. Those that drive c~ (hc,
    cc) have non-zero immediate derivatives, but c reaches the loss only through w_ch, so their
    gradient is exactly zero while w_ch is; one step along the first gradient opens that path, and
    then all four gates of every unit learn.
    """
    learner = make_learner(loss="cosine", phi="identity", weights="zero")
    grad = run_rfp(learner, inputs(7))[0]["rgc.gains"]  # (4, N), rows in GATES order
    assert float(grad[:2].abs().min()) > 0, grad
    assert float(grad[2:].abs().max()) == 0, grad  # c is invisible to the loss while w_ch = 0
    moved = make_learner(loss="cosine", phi="identity", weights="zero")
    with torch.no_grad():
        moved.model.rgc.gains -= 0.1 * grad / grad.abs().max()
    grad = run_rfp(moved, inputs(7))[0]["rgc.gains"]
    assert float(grad.abs().min()) > 0, grad  # every gate of every unit


def test_online_deviation_shrinks_with_the_learning_rate() -> None:
    """Spec 3.10: learning at every fixation, the traces mix derivatives taken under older weights,
    so the last step's RFP gradient is not the gradient at the current weights; the deviation
    shrinks roughly linearly with the learning rate (measured: about 10x per decade)."""
    u = inputs(21, batch=1)
    deviation = {}
    for lr in (1e-2, 1e-3, 1e-4):
        learner = make_learner(loss="mse", phi="tanh", weights="random")
        learner.cfg = learner.cfg.replace(update_mode="every_fixation", lr=lr)
        for group, group_lr in zip(learner.optimizer.param_groups, learner.group_lrs(), strict=True):
            group["lr"] = group_lr
        for t in range(T - 1):  # a step after every fixation
            learner.tick_features(["s"], u[:, t])
        assert learner.updates_applied == T - 2
        learner.cfg = learner.cfg.replace(update_mode="segment", segment_len=0)  # the last: no step
        learner.tick_features(["s"], u[:, T - 1])
        online = split_groups(learner.grads())
        _, per_step = bptt_grads(learner.model, u)  # the whole history at the final weights
        exact = split_groups(per_step[-1])
        rgc = [n for n in exact if n.startswith(("rgc.", "w_", "beta_"))]
        deviation[lr] = max(
            float((online[n] - exact[n]).norm() / exact[n].norm()) for n in rgc if exact[n].norm() > 0
        )
    assert deviation[1e-2] > 1e-4, deviation  # online learning is not exact: the test can see it
    assert deviation[1e-3] < deviation[1e-2] / 4, deviation
    assert deviation[1e-4] < deviation[1e-3] / 4, deviation
