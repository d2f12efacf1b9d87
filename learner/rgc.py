"""Area 6 of R-JEPA: the reciprocal gated circuit (RGC) in "form R", and its per-unit Jacobian.

Velarde & Parra, "Recurrent joint embedding predictive architecture", arXiv 2411.16695; the equations
are reconstructed in ``shared/spec/rfp_math.md`` (section 1.3, form R, and section 2.3)::

    x_t   = W u_t + b
    tau_h = tanh(w_hh * h_{t-1} + beta_hh)      gam_h = tanh(w_ch * c_{t-1} + beta_ch)
    gam_c = tanh(w_hc * h_{t-1} + beta_hc)      tau_c = tanh(w_cc * c_{t-1} + beta_cc)
    h_t   = phi((1 - gam_h) * x_t + tau_h * h_{t-1})
    c_t   = phi((1 - gam_c) * x_t + tau_c * c_{t-1})

Every state-to-state weight is element-wise (one gain per unit), so the state Jacobian is block
diagonal with one 2x2 block per unit; that is what makes RFP exact (spec section 2.2). With all
recurrent weights at zero and beta = 0, ``h_t = phi(x_t)``: a feed-forward net, exact passthrough.

Parameters are kept in three tensors so the traces of ``rfp.py`` can treat them in two slabs:
``W`` and ``b`` share one trace (``b`` is the weight of a constant input 1), and the element-wise
``gains`` (and ``biases``) rows share the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

#: Row order of ``gains`` and ``biases``: which gate each row drives.
GATES = ("hh", "ch", "hc", "cc")


@dataclass
class StepCache:
    """What one forward step leaves for the trace recursion (all (B, N) unless noted)."""

    x: torch.Tensor  # (B, N) feed-forward drive
    h_prev: torch.Tensor  # (B, N)
    c_prev: torch.Tensor  # (B, N)
    tau_h: torch.Tensor
    gam_h: torch.Tensor
    gam_c: torch.Tensor
    tau_c: torch.Tensor
    d_h: torch.Tensor | None  # (B, N) phi'(h~), None for the identity
    d_c: torch.Tensor | None


@dataclass
class Jacobian:
    """Per-unit Jacobian of one step, already multiplied by phi'.

    ``a`` holds the 2x2 blocks d(h_t, c_t)/d(h_{t-1}, c_{t-1}); ``k`` the immediate derivative of
    (h_t, c_t) with respect to row i of ``[W | b]`` divided by the input ``[u, 1]``; ``imm`` the
    immediate derivatives with respect to the element-wise gains (and biases).
    """

    a: torch.Tensor  # (B, N, 2, 2)   [[dh/dh, dh/dc], [dc/dh, dc/dc]]
    k: torch.Tensor  # (B, 2, N)      rows: h, c
    imm: torch.Tensor  # (B, 2, N, G)  G = 4 gains (+ 4 biases)


class RGC(nn.Module):
    """Reciprocal gated circuit, form R: element-wise recurrence, exact passthrough at zero weights.

    Parameters
    ----------
    in_features
        M, width of the input u (the trunk's pooled features).
    n_units
        N, number of units.
    phi
        ``identity`` or ``tanh``.
    gate_bias
        Also learn the gate biases beta (zero-initialised).
    init_scale
        Standard deviation of the initial recurrent gains (0 = the paper's zero init).

    Examples
    --------
    >>> rgc = RGC(in_features=8, n_units=4)
    >>> u = torch.randn(3, 8)
    >>> h, c, _ = rgc.step(u, torch.zeros(3, 4), torch.zeros(3, 4))
    >>> torch.equal(h, rgc.drive(u))  # zero recurrent weights: a feed-forward net
    True
    """

    def __init__(
        self,
        in_features: int,
        n_units: int,
        *,
        phi: str = "identity",
        gate_bias: bool = False,
        init_scale: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if phi not in ("identity", "tanh"):
            raise ValueError(f"phi must be 'identity' or 'tanh', got {phi!r}")
        self.in_features, self.n_units, self.phi = in_features, n_units, phi
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default rule
        self.W = nn.Parameter(torch.empty(n_units, in_features).uniform_(-bound, bound, generator=generator))
        self.b = nn.Parameter(torch.empty(n_units).uniform_(-bound, bound, generator=generator))
        self.gains = nn.Parameter(torch.randn(4, n_units, generator=generator) * init_scale)  # rows: GATES
        self.biases = nn.Parameter(torch.zeros(4, n_units)) if gate_bias else None

    @property
    def n_vector_groups(self) -> int:
        """G, the number of element-wise parameter rows that share the vector trace slab."""
        return 8 if self.biases is not None else 4

    def drive(self, u: torch.Tensor) -> torch.Tensor:
        """x = W u + b, (B, M) -> (B, N)."""
        return torch.addmm(self.b, u, self.W.t())

    def step(
        self, u: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, StepCache]:
        """One step of form R. Differentiable by autograd (the BPTT learner uses it that way)."""
        x = self.drive(u)  # (B, N)
        w = self.gains
        pre = torch.stack((w[0] * h, w[1] * c, w[2] * h, w[3] * c))  # (4, B, N)
        if self.biases is not None:
            pre = pre + self.biases[:, None, :]
        tau_h, gam_h, gam_c, tau_c = torch.tanh(pre).unbind(0)  # each (B, N)
        h_pre = (1 - gam_h) * x + tau_h * h
        c_pre = (1 - gam_c) * x + tau_c * c
        if self.phi == "tanh":
            h_new, c_new = torch.tanh(h_pre), torch.tanh(c_pre)
            d_h, d_c = 1 - h_new * h_new, 1 - c_new * c_new
        else:
            h_new, c_new, d_h, d_c = h_pre, c_pre, None, None
        return h_new, c_new, StepCache(x, h, c, tau_h, gam_h, gam_c, tau_c, d_h, d_c)

    @torch.no_grad()
    def jacobian(self, s: StepCache) -> Jacobian:
        """Per-unit 2x2 Jacobian and immediate derivatives of one step (spec section 2.3)."""
        w_hh, w_ch, w_hc, w_cc = self.gains.unbind(0)  # each (N,)
        tb_h, gb_h = 1 - s.tau_h * s.tau_h, 1 - s.gam_h * s.gam_h  # tanh' of the gates
        gb_c, tb_c = 1 - s.gam_c * s.gam_c, 1 - s.tau_c * s.tau_c
        a_hh = s.tau_h + tb_h * w_hh * s.h_prev
        a_hc = -gb_h * w_ch * s.x
        a_ch = -gb_c * w_hc * s.x
        a_cc = s.tau_c + tb_c * w_cc * s.c_prev
        zero = torch.zeros_like(s.x)
        # immediate d(h~, c~)/d(gain row), rows in GATES order; then the biases
        imm_h = [tb_h * s.h_prev * s.h_prev, -gb_h * s.c_prev * s.x, zero, zero]
        imm_c = [zero, zero, -gb_c * s.h_prev * s.x, tb_c * s.c_prev * s.c_prev]
        if self.biases is not None:
            imm_h += [tb_h * s.h_prev, -gb_h * s.x, zero, zero]
            imm_c += [zero, zero, -gb_c * s.x, tb_c * s.c_prev]
        k_h, k_c = 1 - s.gam_h, 1 - s.gam_c
        if s.d_h is not None and s.d_c is not None:  # chain through phi'
            a_hh, a_hc, k_h = s.d_h * a_hh, s.d_h * a_hc, s.d_h * k_h
            a_ch, a_cc, k_c = s.d_c * a_ch, s.d_c * a_cc, s.d_c * k_c
            imm_h = [s.d_h * v for v in imm_h]
            imm_c = [s.d_c * v for v in imm_c]
        a = torch.stack((torch.stack((a_hh, a_hc), -1), torch.stack((a_ch, a_cc), -1)), -2)  # (B, N, 2, 2)
        k = torch.stack((k_h, k_c), 1)  # (B, 2, N)
        imm = torch.stack((torch.stack(imm_h, -1), torch.stack(imm_c, -1)), 1)  # (B, 2, N, G)
        return Jacobian(a, k, imm)

    def retention_gains(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """|tau| of both retention gates at states (h, c): (B, 2, N). Values near 1 mean long memory."""
        w = self.gains
        pre_h, pre_c = w[0] * h, w[3] * c
        if self.biases is not None:
            pre_h, pre_c = pre_h + self.biases[0], pre_c + self.biases[3]
        return torch.stack((torch.tanh(pre_h), torch.tanh(pre_c)), 1).abs()
