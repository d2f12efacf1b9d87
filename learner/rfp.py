"""Recurrent Forward Propagation (RFP): exact gradients of area 6, carried forward in time.

Velarde & Parra, arXiv 2411.16695 (eqs. 4, 15-20), with the form and the exactness condition of
``shared/spec/rfp_math.md`` sections 2.2-2.4. For every RGC parameter theta each stream carries the
sensitivities of its state, ``P^h_t = dh_t/dtheta`` and ``P^c_t = dc_t/dtheta`` (same shape as theta,
one row per unit, because form R's state Jacobian is block diagonal with 2x2 blocks)::

    P^h_t = a_hh * P^h_{t-1} + a_hc * P^c_{t-1} + b^h_t        (a's and b's already times phi')
    P^c_t = a_ch * P^h_{t-1} + a_cc * P^c_{t-1} + b^c_t        P_0 = 0, reset with h and c

and the loss scored at step t, which reads the state only through h_{t-1}, gives

    dE_t/dtheta = delta_{t-1} * P^h_{t-1}        delta_{t-1} = dE_t/dh_{t-1} (backprop through G, E)

(use the traces *before* advancing them). Summed over a segment at fixed weights this equals the BPTT
gradient exactly; with a step after every fixation it is the online-RTRL approximation whose bias
vanishes with the learning rate (spec 2.6). Memory per stream is ``2 N (M + 1) + 2 N G`` numbers,
whatever the stream's length.

Two trace slabs per stream: ``W`` for ``[W | b]`` (b is the weight of a constant input 1), and
``v`` for the element-wise gains (and gate biases). On the CPU the large W slab is updated in place,
one stream at a time, so each stream's traces are read once and written once; on CUDA all streams of
the tick are updated in one batched pass.
"""

from __future__ import annotations

import torch

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
        self._g_w = self.model.rgc.W.new_zeros(cfg.n_units, cfg.M + 1)  # (N, M+1) scratch gradient
        self._scratch = self.model.rgc.W.new_zeros(cfg.n_units, cfg.M + 1)  # (N, M+1)

    def _trace_shapes(self) -> dict[str, tuple[int, ...]]:
        n, m = self.cfg.n_units, self.cfg.M
        groups = 8 if self.cfg.gate_bias else 4
        return {"W": (2, n, m + 1), "v": (2, n, groups)}  # row 0: dh/dtheta, row 1: dc/dtheta

    # --- one tick -----------------------------------------------------------------------------
    def _learn(self, slots: torch.Tensor, u: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        model, st = self.model, self.states
        h_prev, c_prev = st.h[slots], st.c[slots]  # (B, N) each, copies
        with torch.no_grad():
            h, c, cache = model.rgc.step(u, h_prev, c_prev)  # (B, N)
        error = self.nan_errors(len(slots), h)
        idx = scored.nonzero().squeeze(1)
        if idx.numel():
            hp = h_prev[idx].requires_grad_(True)  # (Bs, N)
            per_stream = model.loss(hp, h[idx])  # (Bs,)
            head = model.head_parameters()
            grads = torch.autograd.grad(per_stream.mean(), [hp, *head])
            for p, g in zip(head, grads[1:], strict=True):
                p.grad.add_(g)
            self._accumulate_rgc_grads(slots[idx], grads[0])  # uses the traces of step t-1
            error[idx] = per_stream.detach()
        self._advance_traces(slots, model.rgc.jacobian(cache), u)
        st.h[slots], st.c[slots] = h, c
        return error

    @torch.no_grad()
    def _accumulate_rgc_grads(self, slots: torch.Tensor, delta: torch.Tensor) -> None:
        """theta.grad += sum_b delta_b * P^h_b(theta); delta (Bs, N) already carries the 1/Bs of the mean."""
        rgc, st = self.model.rgc, self.states
        m = self.cfg.M
        g_w = self._g_w
        if self.batched_traces:
            g_w.copy_(torch.einsum("bn,bnm->nm", delta, st.trace["W"][slots, 0]))  # (N, M+1)
        else:
            g_w.zero_()
            for i, s in enumerate(slots.tolist()):
                g_w.addcmul_(delta[i, :, None], st.trace["W"][s, 0])  # (N, M+1)
        g_v = torch.einsum("bn,bng->gn", delta, st.trace["v"][slots, 0])  # (G, N)
        rgc.W.grad.add_(g_w[:, :m])
        rgc.b.grad.add_(g_w[:, m])
        rgc.gains.grad.add_(g_v[:4])
        if rgc.biases is not None:
            rgc.biases.grad.add_(g_v[4:])

    @torch.no_grad()
    def _advance_traces(self, slots: torch.Tensor, jac: Jacobian, u: torch.Tensor) -> None:
        """P_t = a P_{t-1} + b_t for both slabs (spec 2.3), in place in the stream slots."""
        st = self.states
        a = jac.a  # (B, N, 2, 2)
        u1 = torch.cat([u, u.new_ones(u.shape[0], 1)], 1)  # (B, M+1): [u, 1] drives [W | b]
        st.trace["v"][slots] = _mix(st.trace["v"][slots], a, jac.imm)  # (B, 2, N, G)
        if self.batched_traces:
            imm_w = jac.k[..., None] * u1[:, None, None, :]  # (B, 2, N, M+1)
            st.trace["W"][slots] = _mix(st.trace["W"][slots], a, imm_w)
            return
        buf = self._scratch
        for i, s in enumerate(slots.tolist()):
            p_h, p_c = st.trace["W"][s]  # (N, M+1) views into the slab
            a_i = a[i, :, :, :, None]  # (N, 2, 2, 1)
            torch.mul(p_h, a_i[:, 0, 0], out=buf)
            buf.addcmul_(p_c, a_i[:, 0, 1]).addr_(jac.k[i, 0], u1[i])  # new P^h
            p_c.mul_(a_i[:, 1, 1]).addcmul_(p_h, a_i[:, 1, 0]).addr_(jac.k[i, 1], u1[i])  # new P^c
            p_h.copy_(buf)


def _mix(p: torch.Tensor, a: torch.Tensor, imm: torch.Tensor) -> torch.Tensor:
    """Batched per-unit 2x2 recursion: p (B, 2, N, X), a (B, N, 2, 2), imm (B, 2, N, X) -> (B, 2, N, X)."""
    p_h, p_c = p[:, 0], p[:, 1]  # (B, N, X)
    a = a[..., None]  # (B, N, 2, 2, 1)
    new_h = a[:, :, 0, 0] * p_h + a[:, :, 0, 1] * p_c + imm[:, 0]
    new_c = a[:, :, 1, 0] * p_h + a[:, :, 1, 1] * p_c + imm[:, 1]
    return torch.stack((new_h, new_c), 1)
