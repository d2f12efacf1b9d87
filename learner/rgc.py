"""Area 6 of R-JEPA: the reciprocal gated circuit (RGC) in "form R", and its per-unit Jacobian.

Velarde & Parra, "Recurrent joint embedding predictive architecture", arXiv 2411.16695; the equations
are reconstructed in ``shared/spec/rfp_math.md`` (section 1.3, form R, and section 2.3) and written
out for this code in ``docs/math.md``::

    x_t   = W v_t + b          v_t = P^T u_t (a fixed projection to K inputs), or u_t itself
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
    """What one forward step leaves for the trace recursion."""

    x: torch.Tensor  # (B, N) feed-forward drive
    v: torch.Tensor  # (B, K) what W multiplies: P^T u, or u without a projection
    src: torch.Tensor  # (4, B, N) each gate's input, in GATES order: (h, c, h, c) of step t-1
    gates: torch.Tensor  # (4, B, N) tanh of each gate, in GATES order: tau_h, gam_h, gam_c, tau_c
    d_hc: torch.Tensor | None  # (2, B, N) phi' of (h~, c~), None for the identity


@dataclass
class Jacobian:
    """Per-unit Jacobian of one step, already multiplied by phi'.

    ``a`` holds the 2x2 blocks d(h_t, c_t)/d(h_{t-1}, c_{t-1}); ``k`` the immediate derivative of
    (h_t, c_t) with respect to row i of ``[W | b]`` divided by the input ``[v, 1]``; ``imm`` the
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
    inputs
        K < M: read ``v = P^T u`` with P a fixed (M, K) random projection with orthonormal columns
        (the ``proj`` buffer), so W is (N, K); None (or K >= M): read u itself.
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

    _diag: torch.Tensor
    _rows_of: torch.Tensor
    proj: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        n_units: int,
        *,
        inputs: int | None = None,
        phi: str = "identity",
        gate_bias: bool = False,
        init_scale: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if phi not in ("identity", "tanh"):
            raise ValueError(f"phi must be 'identity' or 'tanh', got {phi!r}")
        self.in_features, self.n_units, self.phi = in_features, n_units, phi
        proj, width = None, in_features  # width: K, what W multiplies
        if inputs is not None and 0 < inputs < in_features:
            # orthonormal columns: whitened inputs (covariance I) give v with covariance I too
            proj, _ = torch.linalg.qr(torch.randn(in_features, inputs, generator=generator))  # (M, K)
            width = inputs
        self.register_buffer("proj", proj)
        bound = 1.0 / math.sqrt(width)  # nn.Linear's default rule
        self.W = nn.Parameter(torch.empty(n_units, width).uniform_(-bound, bound, generator=generator))
        self.b = nn.Parameter(torch.empty(n_units).uniform_(-bound, bound, generator=generator))
        self.gains = nn.Parameter(torch.randn(4, n_units, generator=generator) * init_scale)  # rows: GATES
        self.biases = nn.Parameter(torch.zeros(4, n_units)) if gate_bias else None
        # constants of the Jacobian: which gates' tanh sits on the block diagonal (tau_h, tau_c), and
        # which state row (h~ or c~) each gate's parameters move, per parameter row (gains, biases)
        self.register_buffer("_diag", torch.tensor([1.0, 0.0, 0.0, 1.0]), persistent=False)
        rows_of = torch.tensor([[1.0, 1, 0, 0] * 2, [0.0, 0, 1, 1] * 2])[:, None, :]  # (2, 1, 8)
        self.register_buffer("_rows_of", rows_of, persistent=False)

    @property
    def n_vector_groups(self) -> int:
        """G, the number of element-wise parameter rows that share the vector trace slab."""
        return 8 if self.biases is not None else 4

    def inputs(self, u: torch.Tensor) -> torch.Tensor:
        """v, what W multiplies: (B, M) -> (B, K), ``P^T u`` with a projection, else u itself."""
        return u if self.proj is None else u @ self.proj

    def drive(self, u: torch.Tensor) -> torch.Tensor:
        """x = W v + b, (B, M) -> (B, N)."""
        return torch.addmm(self.b, self.inputs(u), self.W.t())

    def step(
        self, u: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, StepCache]:
        """One step of form R. Differentiable by autograd (the BPTT learner uses it that way).

        The four gates are computed as one stacked (4, B, N) tensor: a step is a few dozen small
        operations at one stream per tick, where each one's fixed cost is what counts.
        """
        v = self.inputs(u)  # (B, K)
        x = torch.addmm(self.b, v, self.W.t())  # (B, N)
        src = torch.stack((h, c, h, c))  # (4, B, N) in GATES order
        pre = src * self.gains[:, None, :]
        if self.biases is not None:
            pre = pre + self.biases[:, None, :]
        gates = torch.tanh(pre)  # (4, B, N): tau_h, gam_h, gam_c, tau_c
        # (h~, c~) = (1 - (gam_h, gam_c)) * x + (tau_h, tau_c) * (h, c)
        hc_pre = torch.addcmul((1 - gates[1:3]) * x, gates[0::3], src[0::3])  # (2, B, N)
        if self.phi == "tanh":
            hc = torch.tanh(hc_pre)
            d_hc: torch.Tensor | None = 1 - hc * hc
        else:
            hc, d_hc = hc_pre, None
        return hc[0], hc[1], StepCache(x, v, src, gates, d_hc)

    @torch.no_grad()
    def jacobian(self, s: StepCache) -> Jacobian:
        """Per-unit 2x2 Jacobian and immediate derivatives of one step (docs/math.md, section 3).

        Every gate g is tanh(pre_g), pre_g = w_g * src_g + beta_g, and multiplies m_g in h~ or c~;
        q_g = tanh'(pre_g) * m_g is all the table needs::

            gate g       drives  src_g    m_g      block entry               d/dw_g        d/dbeta_g
            hh (tau_h)   h~      h_{t-1}  h_{t-1}  a_hh = tau_h + q_hh w_hh  q_hh h_{t-1}  q_hh
            ch (gam_h)   h~      c_{t-1}  -x_t     a_hc = q_ch w_ch          q_ch c_{t-1}  q_ch
            hc (gam_c)   c~      h_{t-1}  -x_t     a_ch = q_hc w_hc          q_hc h_{t-1}  q_hc
            cc (tau_c)   c~      c_{t-1}  c_{t-1}  a_cc = tau_c + q_cc w_cc  q_cc c_{t-1}  q_cc

        and the drive x = W v + b moves h~ by k_h = 1 - gam_h and c~ by k_c = 1 - gam_c. Below,
        ``m = (h, -x, -x, c)`` is the column m_g, ``_diag`` adds tau on the diagonal, ``_rows_of``
        puts each gate's derivatives in the h row or the c row, and phi' (tanh) multiplies each row.
        """
        x, gates, src = s.x, s.gates, s.src
        gp = 1 - gates * gates  # (4, B, N) tanh'
        neg_x = -x
        m = torch.stack((src[0], neg_x, neg_x, src[3]))  # (4, B, N)
        q = gp.mul_(m)  # (4, B, N), in place: gp is not needed again
        a = torch.addcmul(q * self.gains[:, None, :], gates, self._diag[:, None, None])
        k = (1 - gates[1:3]).transpose(0, 1)  # (B, 2, N): 1 - (gam_h, gam_c)
        imm = q * src if self.biases is None else torch.cat((q * src, q))  # (G, B, N)
        if s.d_hc is not None:  # chain through phi': rows of h~ by phi'(h~), rows of c~ by phi'(c~)
            d_h, d_c = s.d_hc[0], s.d_hc[1]
            a = a * torch.stack((d_h, d_h, d_c, d_c))
            k = k * s.d_hc.transpose(0, 1)
            imm = imm * torch.stack((d_h, d_h, d_c, d_c) * (imm.shape[0] // 4))
        a_blocks = a.permute(1, 2, 0).contiguous().view(*x.shape, 2, 2)  # (B, N, 2, 2), contiguous for bmm
        # gate g's parameters move h~ (gates hh, ch) or c~ (gates hc, cc) only
        imm_rows = imm.permute(1, 2, 0).unsqueeze(1) * self._rows_of[..., : imm.shape[0]]  # (B, 2, N, G)
        return Jacobian(a_blocks, k, imm_rows)


def spectral_radius(a: torch.Tensor) -> torch.Tensor:
    """Spectral radius of each unit's 2x2 Jacobian block: (..., 2, 2) -> (...).

    The block is the factor by which the unit's state perturbations, and its RFP traces, are
    multiplied at each step (P_t = a_t P_{t-1} + b_t): a radius persistently above 1 means they grow.
    (|tau| alone cannot reach 1 unless a gate saturates, and ignores the reciprocal gates.)
    """
    p, q, r, s = a[..., 0, 0], a[..., 0, 1], a[..., 1, 0], a[..., 1, 1]
    half_trace, det = (p + s) / 2, p * s - q * r
    disc = half_trace * half_trace - det
    real = half_trace.abs() + disc.clamp(min=0).sqrt()  # two real eigenvalues: the larger |lambda|
    return torch.where(disc >= 0, real, det.clamp(min=0).sqrt())  # complex pair: |lambda|^2 = det
