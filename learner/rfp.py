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

import torch

from learner import head as hand
from learner.errors import ConfigError
from learner.kernels import advance_w_traces, mix
from learner.model import Scores
from learner.rgc import Jacobian
from learner.streaming import StreamLearner, grad_of


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
    head
        How delta = dE/dh_{t-1} and the head's gradients are computed: ``hand`` (``learner.head``,
        a few matrix products), ``autograd``, or ``auto`` (hand when ``learner.head.supports`` the
        model, which is the case for every ``ModelConfig`` but the linear predictor).

    Examples
    --------
    >>> from learner.config import ModelConfig
    >>> cfg = ModelConfig(trunk="none", in_features=8, n_units=6, embed_dim=4, pred_hidden=5, lr=1e-2,
    ...                   loss="cosine")  # whitened_mse, the default, waits for its whitenings
    >>> learner = RFPLearner(cfg)
    >>> out = learner.tick_features(["a", "b"], torch.randn(2, 8))
    >>> out.error.isnan().all().item()      # first fixations: nothing was predicted yet
    True
    >>> out = learner.tick_features(["a", "b"], torch.randn(2, 8))
    >>> out.step.tolist(), out.updated
    ([2, 2], True)
    """

    def __init__(  # type: ignore[no-untyped-def]
        self, *args, batched_traces: bool | None = None, head: str = "auto", **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.batched_traces = self.device.type == "cuda" if batched_traces is None else batched_traces
        cfg = self.cfg
        self._scratch = self.model.rgc.W.new_zeros(cfg.n_units, 2, cfg.K + 1)  # (N, 2, K+1)
        if head not in ("auto", "hand", "autograd"):
            raise ConfigError(f"head must be 'auto', 'hand' or 'autograd', got {head!r}")
        if head == "hand" and not hand.supports(self.model):
            raise ConfigError(f"the hand-written head does not cover predictor={cfg.predictor!r}")
        use_hand = head == "hand" or (head == "auto" and hand.supports(self.model))
        self._head = hand.hand_head(self.model) if use_hand else None

    def _trace_shapes(self) -> dict[str, tuple[int, ...]]:
        n, k = self.cfg.n_units, self.cfg.K
        groups = 8 if self.cfg.gate_bias else 4
        return {"W": (2, n, k + 1), "v": (2, n, groups)}  # row 0: dh/dtheta, row 1: dc/dtheta

    # --- one tick -----------------------------------------------------------------------------
    def _learn(
        self, slots: torch.Tensor, u: torch.Tensor, scored: torch.Tensor, v: torch.Tensor | None = None
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
            vs = v[rows] if v is not None else None
            got, delta = self._head_backward(st.u[slots][rows], h_prev[rows], u[rows], h[rows], vs)
            out.put(rows, got)
        jac = model.rgc.jacobian(cache)
        self._rgc_grads_and_traces(slots, idx, delta, jac, cache.v)
        st.h[slots], st.c[slots] = h, c
        return out, jac.a

    def _head_backward(
        self,
        u_prev: torch.Tensor,
        h_prev: torch.Tensor,
        u: torch.Tensor,
        h: torch.Tensor,
        v: torch.Tensor | None = None,
    ) -> tuple[Scores, torch.Tensor]:
        """Scored streams' scores and delta = d(mean loss)/d h_prev (Bs, N), the mean taken over the
        well-conditioned rows (the others get delta 0); E's, G's (and the preview's Q's) gradients
        of that mean are added to their ``.grad``. ``v``: the rows' whitened previews, or None."""
        if self._head is not None:
            return hand.backward(self._head, self.cfg, u_prev, h_prev, u, h, v)
        model = self.model
        got = model.scores(u_prev, h_prev, u, h, v)
        hp = h_prev.detach().requires_grad_(True)
        weight = got.ok.to(h_prev.dtype).div_(max(int(got.ok.sum()), 1))  # (Bs,)
        per_stream = model.loss(u_prev, hp, u, h, v)  # (Bs,)
        head = [p for p in model.head_parameters() if p.requires_grad]
        grads = torch.autograd.grad((per_stream * weight).sum(), [hp, *head])
        for p, g in zip(head, grads[1:], strict=True):
            grad_of(p).add_(g)
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
        P_t = a P_{t-1} + b_t for both slabs of every stream (docs/math.md, sections 3-4), in place
        in the stream slots. ``v`` (B, K) is what W multiplies this tick (``StepCache.v``)."""
        rgc, st = self.model.rgc, self.states
        # the gains and gate biases: a small slab, written plainly
        p_v = st.trace["v"][slots]  # (B, 2, N, G), a copy
        if delta is not None:
            sel = slice(None) if idx.numel() == len(slots) else idx
            g_v = torch.einsum("bn,bng->gn", delta, p_v[sel, 0])  # (G, N)
            grad_of(rgc.gains).add_(g_v[:4])
            if rgc.biases is not None:
                grad_of(rgc.biases).add_(g_v[4:])
        st.trace["v"][slots] = mix(p_v, jac.a).add_(jac.imm)
        # [W | b]: the same two lines (gradient from P^h_{t-1}, then P_t = a P_{t-1} + k [v, 1]^T),
        # in place and in two passes over the traces (learner.kernels)
        v1 = torch.cat([v, v.new_ones(v.shape[0], 1)], 1)  # (B, K+1): [v, 1] drives [W | b]
        advance_w_traces(
            st.trace["W"],
            slots,
            idx,
            delta,
            jac.a,
            jac.k,
            v1,
            grad_of(rgc.W),
            grad_of(rgc.b),
            self._scratch,
            batched=self.batched_traces,
        )
