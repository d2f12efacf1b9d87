"""Recurrent Forward Propagation (RFP): exact gradients of area 6, carried forward in time.

Velarde & Parra, arXiv 2411.16695 (eqs. 4, 15-20), with the form and the exactness condition of
``shared/spec/rfp_math.md`` sections 2.2-2.4, written out for this code in ``docs/math.md``
(sections 2-4). For every RGC parameter theta each stream carries the
sensitivities of its state, ``P^h_t = dh_t/dtheta`` and ``P^c_t = dc_t/dtheta`` (same shape as theta,
one row per unit, because form R's state Jacobian is block diagonal with 2x2 blocks)::

    P^h_t = a_hh * P^h_{t-1} + a_hc * P^c_{t-1} + b^h_t        (a's and b's already times phi')
    P^c_t = a_ch * P^h_{t-1} + a_cc * P^c_{t-1} + b^c_t        P_0 = 0, reset with h and c

and the loss scored at step t, which reads the state only through h_{t-1}, gives

    dE_t/dtheta = delta_{t-1} * P^h_{t-1}        delta_{t-1} = dE_t/dh_{t-1} (backprop through G, E)

(use the traces *before* advancing them). Summed over a segment at fixed weights this equals the BPTT
gradient exactly; with a step after every fixation it is the online-RTRL approximation whose bias
vanishes with the learning rate (spec 2.6). Memory per stream is ``2 N (K + 1) + 2 N G`` numbers
(K: the inputs area 6 reads, ``ModelConfig.rgc_inputs``), whatever the stream's length.

Two trace slabs per stream: ``W`` for ``[W | b]`` (b is the weight of a constant input 1), and
``v`` for the element-wise gains (and gate biases). On the CPU the large W slab is updated in place,
one stream at a time (a batched product of the N 2x2 blocks into a scratch slab, written back with
the input's outer product: two passes, the gradient read just before); on CUDA all
streams of the tick are updated in one batched pass. The head (context whitening, E, and the MLP
or residual predictor G) is differentiated by hand in a few matrix products: at B = 1 autograd's
graph cost as much as the arithmetic. A head of any other shape falls back to autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from learner.config import ModelConfig
from learner.model import (
    RJEPA,
    ResidualPredictor,
    RunningWhitening,
    Scores,
    prediction_loss,
)
from learner.rgc import Jacobian
from learner.streaming import StreamLearner


class RFPLearner(StreamLearner):
    """R-JEPA whose recurrent area learns by exact RFP; E and G by per-step backprop.

    Parameters
    ----------
    cfg
        The model and learning configuration (``update_mode``: ``every_fixation`` or ``segment``).
    device
        ``cpu``, ``cuda`` or ``auto``.
    dtype
        Dtype of the weights, states and traces (float32; float64 for exactness checks).
    batched_traces
        Update the W traces of all streams in one batched pass (default: on CUDA only).

    Examples
    --------
    >>> from learner.config import ModelConfig
    >>> cfg = ModelConfig(trunk="none", in_features=8, n_units=6, embed_dim=4, pred_hidden=5, lr=1e-2)
    >>> learner = RFPLearner(cfg)
    >>> out = learner.tick_features(["a", "b"], torch.randn(2, 8))
    >>> out.error.isnan().all().item()      # first fixations: nothing was predicted yet
    True
    >>> out = learner.tick_features(["a", "b"], torch.randn(2, 8))
    >>> out.step.tolist(), out.updated
    ([2, 2], True)
    """

    def __init__(self, *args, batched_traces: bool | None = None, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.batched_traces = self.device.type == "cuda" if batched_traces is None else batched_traces
        cfg = self.cfg
        self._scratch = self.model.rgc.W.new_zeros(cfg.n_units, 2, cfg.K + 1)  # (N, 2, K+1)
        self._head = _hand_head(self.model)

    def _trace_shapes(self) -> dict[str, tuple[int, ...]]:
        n, k = self.cfg.n_units, self.cfg.K
        groups = 8 if self.cfg.gate_bias else 4
        return {"W": (2, n, k + 1), "v": (2, n, groups)}  # row 0: dh/dtheta, row 1: dc/dtheta

    # --- one tick -----------------------------------------------------------------------------
    def _learn(
        self, slots: torch.Tensor, u: torch.Tensor, scored: torch.Tensor
    ) -> tuple[Scores, torch.Tensor]:
        model, st = self.model, self.states
        h_prev, c_prev = st.h[slots], st.c[slots]  # (B, N) each, copies
        with torch.no_grad():
            h, c, cache = model.rgc.step(u, h_prev, c_prev)  # (B, N)
        out = self.scored_rows(len(slots), h)
        idx = scored.nonzero().squeeze(1)  # (Bs,) rows of the tick that are scored
        delta = None
        if idx.numel():
            rows = slice(None) if idx.numel() == len(slots) else idx
            got, delta = self._head_backward(st.u[slots][rows], h_prev[rows], u[rows], h[rows])
            out.put(rows, got)
        jac = model.rgc.jacobian(cache)
        self._rgc_grads_and_traces(slots, idx, delta, jac, cache.v)
        st.h[slots], st.c[slots] = h, c
        return out, jac.a

    def _head_backward(
        self, u_prev: torch.Tensor, h_prev: torch.Tensor, u: torch.Tensor, h: torch.Tensor
    ) -> tuple[Scores, torch.Tensor]:
        """Scored streams' scores and delta = d(mean loss)/d h_prev (Bs, N), the mean taken over the
        well-conditioned rows (the others get delta 0); E's and G's gradients of that mean are added
        to their ``.grad``."""
        if self._head is not None:
            return _head_backward_by_hand(self._head, self.cfg, u_prev, h_prev, u, h)
        model = self.model
        got = model.scores(u_prev, h_prev, u, h)
        hp = h_prev.detach().requires_grad_(True)
        weight = got.ok.to(h_prev.dtype).div_(max(int(got.ok.sum()), 1))  # (Bs,)
        per_stream = model.loss(u_prev, hp, u, h)  # (Bs,)
        head = [p for p in model.head_parameters() if p.requires_grad]
        grads = torch.autograd.grad((per_stream * weight).sum(), [hp, *head])
        for p, g in zip(head, grads[1:], strict=True):
            _grad(p).add_(g)
        return got, grads[0]

    @torch.no_grad()
    def _rgc_grads_and_traces(
        self,
        slots: torch.Tensor,
        idx: torch.Tensor,
        delta: torch.Tensor | None,
        jac: Jacobian,
        v: torch.Tensor,
    ) -> None:
        """theta.grad += sum_b delta_b * P^h_b(theta) over the scored rows ``idx`` (delta (Bs, N)
        already carries the 1/Bs of the mean), with the traces of step t-1; then
        P_t = a P_{t-1} + b_t for both slabs of every stream (spec 2.3), in place in the stream slots.
        ``v`` (B, K) is what W multiplies this tick (``StepCache.v``)."""
        rgc, st, m = self.model.rgc, self.states, self.cfg.K
        sel = slice(None) if idx.numel() == len(slots) else idx
        a = jac.a  # (B, N, 2, 2)
        u1 = torch.cat([v, v.new_ones(v.shape[0], 1)], 1)  # (B, K+1): [v, 1] drives [W | b]
        p_v = st.trace["v"][slots]  # (B, 2, N, G), a copy
        if delta is not None:
            g_v = torch.einsum("bn,bng->gn", delta, p_v[sel, 0])  # (G, N)
            _grad(rgc.gains).add_(g_v[:4])
            if rgc.biases is not None:
                _grad(rgc.biases).add_(g_v[4:])
        st.trace["v"][slots] = _mix(p_v, a).add_(jac.imm)
        trace_w, w_grad, b_grad = st.trace["W"], _grad(rgc.W), _grad(rgc.b)
        if self.batched_traces:
            p_w = trace_w[slots]  # (B, 2, N, K+1), a copy
            if delta is not None:
                g_w = torch.einsum("bn,bnm->nm", delta, p_w[sel, 0])  # (N, K+1)
                w_grad.add_(g_w[:, :m])
                b_grad.add_(g_w[:, m])
            trace_w[slots] = _mix(p_w, a).addcmul_(jac.k[..., None], u1[:, None, None, :])
            return
        deltas = {} if delta is None else dict(zip(idx.tolist(), delta.unbind(0), strict=True))  # row -> (N,)
        k = jac.k.transpose(1, 2).unsqueeze(-1)  # (B, N, 2, 1): [k_h, k_c] of each unit
        buf = self._scratch  # (N, 2, K+1)
        for i, s in enumerate(slots.tolist()):
            p = trace_w[s]  # (2, N, K+1), a view into the slab
            d = deltas.get(i)
            if d is not None:  # straight into .grad, while this stream's P^h is still that of t-1
                w_grad.addcmul_(p[0, :, :m], d[:, None])
                b_grad.addcmul_(p[0, :, m], d)
            # per unit n: [P^h; P^c]_n <- a_n [P^h; P^c]_n + [k_h; k_c]_n u1^T, as one batched product
            # of N 2x2 blocks (one pass over the traces), then the outer product on the way back
            units = p.permute(1, 0, 2)  # (N, 2, K+1) view
            torch.bmm(a[i], units, out=buf)
            torch.addcmul(buf, k[i], u1[i], out=units)


def _mix(p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per-unit 2x2 blocks times the trace pairs: p (B, 2, N, X), a (B, N, 2, 2) -> a new (B, 2, N, X)."""
    col_h = a[..., 0].transpose(1, 2).unsqueeze(-1)  # (B, 2, N, 1): [a_hh; a_ch]
    col_c = a[..., 1].transpose(1, 2).unsqueeze(-1)  # (B, 2, N, 1): [a_hc; a_cc]
    return (col_h * p[:, :1]).addcmul_(col_c, p[:, 1:])


@dataclass(frozen=True)
class _Head:
    """The head as ``_head_backward_by_hand`` differentiates it: p = [z +] lin2(relu(lin1(z))),
    z = E kappa, kappa = [u; s] (or s alone when ``context`` is 0), s = the state h, whitened by
    ``norm`` when there is one."""

    e: nn.Linear
    lin1: nn.Linear
    lin2: nn.Linear
    residual: bool
    norm: RunningWhitening | None
    context: int  # M, the width of u in kappa (0: the embedding reads the state alone)
    model: RJEPA  # for whitened_mse's metric (``RJEPA.change_metric``) and whether it is ready


def _hand_head(model: RJEPA) -> _Head | None:
    """The head's layers when it is exactly one ``_head_backward_by_hand`` knows (E linear without
    bias after the optional context whitening, G = [z +] Linear-ReLU-Linear with biases, the loss
    of ``model.prediction_loss``); None for anything else, which then goes through autograd."""
    cls, g, norm = type(model), model.G, model.context_norm
    known = (
        cls.embed is RJEPA.embed
        and cls.context is RJEPA.context
        and cls.predict is RJEPA.predict
        and cls.loss is RJEPA.loss
        and cls.scores is RJEPA.scores
        and cls.distance is RJEPA.distance
        and cls.change_metric is RJEPA.change_metric
        and cls.learnable is RJEPA.learnable
        and model.cfg.loss in ("cosine", "mse", "whitened_mse")
        and (norm is None or type(norm).transform is RunningWhitening.transform)
    )
    e_bias: torch.Tensor | None = model.E.bias
    if not known or e_bias is not None:
        return None
    layers: tuple[nn.Module, nn.Module]
    if type(g) is ResidualPredictor:
        layers, residual = (g.lin1, g.lin2), True
    elif type(g) is nn.Sequential and len(g) == 3 and type(g[1]) is nn.ReLU:
        layers, residual = (g[0], g[2]), False
    else:
        return None
    lin1, lin2 = layers
    if not (type(model.E) is type(lin1) is type(lin2) is nn.Linear):
        return None
    assert isinstance(lin1, nn.Linear) and isinstance(lin2, nn.Linear)
    biases: tuple[torch.Tensor | None, ...] = (lin1.bias, lin2.bias)
    head = _Head(model.E, lin1, lin2, residual, norm, model.context_features, model)
    return head if None not in biases else None


def _grad(p: torch.Tensor) -> torch.Tensor:
    """``p.grad``: StreamLearner gives every trainable parameter a zeroed gradient at the start."""
    g = p.grad
    assert g is not None
    return g


@torch.no_grad()
def _head_backward_by_hand(
    head: _Head,
    cfg: ModelConfig,
    u_prev: torch.Tensor,
    h_prev: torch.Tensor,
    u: torch.Tensor,
    h: torch.Tensor,
) -> tuple[Scores, torch.Tensor]:
    """Scores of D(G(z(u_prev, h_prev)), sg(z(u, h))) per stream, and the gradient of their mean, by hand.

    The mean is taken over the rows ``RJEPA.learnable`` keeps (well-conditioned); the others give
    no gradient. Adds the gradients of E and of G's two layers to their ``.grad`` and returns
    d(mean)/d h_prev (Bs, N). Same values as autograd through ``model.loss`` up to rounding (the
    exactness tests compare RFP with an autograd BPTT reference in float64). The context whitening,
    when there is one, is a constant linear map of each step: s = (h - mean) @ whiten.
    """
    e, lin1, lin2, norm = head.e.weight, head.lin1, head.lin2, head.norm  # e: (D, M + N) or (D, N)
    w1, b1, w2, b2 = lin1.weight, lin1.bias, lin2.weight, lin2.bias  # (H, D), (H,), (D, H), (D,)
    bs = h_prev.shape[0]
    both = torch.cat([h_prev, h])  # (2 Bs, N): the context's state and the target's, in one pass
    s_both = norm.transform(both) if norm is not None else both
    if head.context:
        s_both = torch.cat([torch.cat([u_prev, u]), s_both], 1)  # (2 Bs, M + N): kappa = [u; s]
    z_both = s_both @ e.t()  # (2 Bs, D)
    k_prev, z, target = s_both[:bs], z_both[:bs], z_both[bs:]  # target: sg(z_t)
    pre = torch.addmm(b1, z, w1.t())  # (Bs, H)
    hidden = pre.relu()
    p = torch.addmm(b2, hidden, w2.t())  # (Bs, D) the prediction
    if head.residual:
        p.add_(z)
    ok = head.model.learnable(p, target)  # (Bs,)
    weight = ok.to(p.dtype).div_(max(int(ok.sum()), 1))[:, None]  # (Bs, 1): the mean over ok rows
    metric = head.model.change_metric()  # (D, D) for whitened_mse, else None
    repeat = prediction_loss(z, target, cfg.loss, metric)
    if cfg.loss == "cosine":
        eps = 1e-12  # as in model.prediction_loss (F.cosine_similarity clamps each norm at eps)
        p_len = p.norm(dim=1, keepdim=True).clamp_min_(eps)  # (Bs, 1)
        p_hat = p / p_len
        t_hat = target / target.norm(dim=1, keepdim=True).clamp_min_(eps)
        cos = (p_hat * t_hat).sum(1, keepdim=True)  # (Bs, 1)
        per_stream = 1 - cos[:, 0]
        g_p = (p_hat * cos - t_hat).div_(p_len).mul_(weight)  # d(1 - cos)/dp = (cos p^ - t^) / |p|
    elif metric is not None:  # |(p - t) A|^2 / D
        dim = p.shape[1]
        scaled = (p - target) @ metric  # (Bs, D)
        per_stream = scaled.pow(2).sum(1) / dim
        g_p = (scaled @ metric.t()).mul_(weight * (2.0 / dim))
    else:
        diff = p - target
        per_stream = 0.5 * diff.pow(2).sum(1)
        g_p = diff.mul_(weight)
    _grad(w2).addmm_(g_p.t(), hidden)  # (D, H)
    _grad(b2).add_(g_p.sum(0))
    g_pre = (g_p @ w2).mul_(pre > 0)  # (Bs, H), through the ReLU
    _grad(w1).addmm_(g_pre.t(), z)  # (H, D)
    _grad(b1).add_(g_pre.sum(0))
    g_z = g_pre @ w1  # (Bs, D)
    if head.residual:
        g_z.add_(g_p)
    if e.requires_grad:  # E is fixed at embed_lr_scale 0
        _grad(e).addmm_(g_z.t(), k_prev)  # (D, M + N)
    delta = g_z @ e[:, head.context :]  # (Bs, N): only the state part of kappa reaches the RGC
    delta = delta @ norm.whiten.t() if norm is not None else delta
    return Scores(per_stream, repeat, ok, target - z), delta
