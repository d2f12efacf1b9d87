"""Diagnostics the service exports: is the model learning, and is its embedding healthy?

* prediction error by time step within a sequence (the paper's Fig. 4, live): errors should fall
  with the step once the recurrent area has learned to use its memory;
* effective dimensionality of the embedding (participation ratio of the covariance eigenvalues,
  ``(sum l)^2 / sum l^2``) and the spectrum, over a sliding window: a collapse shows as a small ratio
  (the paper reports about 50 of 120 after learning);
* the same errors of the "repeat the current embedding" baseline (spec 1.6), so that skill,
  1 - model error / repeat error, can be read by step;
* mean norm of h, and the largest spectral radius of a unit's 2x2 Jacobian block in the last tick
  (``rgc.spectral_radius``: above 1 state perturbations and RFP traces grow);
* the Theorem 1 check (spec 1.5): with balanced learning ``G^T G`` becomes proportional to the
  embedding covariance; we report the cosine similarity of the two matrices and their off-diagonal
  mass. For an MLP predictor, G is linearised at the mean embedding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def participation_ratio(eigenvalues: torch.Tensor) -> float:
    """Effective dimensionality (sum l)^2 / sum l^2 of non-negative eigenvalues; 0 for all zeros."""
    lam = eigenvalues.clamp(min=0).double()
    denom = float((lam * lam).sum())
    return float(lam.sum() ** 2 / denom) if denom > 0 else 0.0


def covariance_spectrum(z: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the covariance of the rows of z (W, D), largest first: (D,)."""
    zc = z.double() - z.double().mean(0, keepdim=True)
    cov = zc.T @ zc / max(1, z.shape[0] - 1)  # (D, D)
    return torch.linalg.eigvalsh(cov).flip(0).clamp(min=0)


def offdiag_mass(m: torch.Tensor) -> float:
    """||M - diag(M)||_F / ||M||_F: 0 for a diagonal matrix."""
    total = float(m.norm())
    return float((m - torch.diag(torch.diag(m))).norm() / total) if total > 0 else 0.0


def predictor_jacobian(g: nn.Module, z_mean: torch.Tensor) -> torch.Tensor:
    """Jacobian of the predictor at ``z_mean`` (D,): (D, D); the weight itself for a linear G."""
    if isinstance(g, nn.Linear):
        return g.weight.detach()
    return torch.autograd.functional.jacobian(lambda z: g(z), z_mean.detach()).detach()


def theorem1(g_lin: torch.Tensor, cov_z: torch.Tensor) -> dict[str, float]:
    """Compare G^T G with the embedding covariance (both (D, D))."""
    gtg = (g_lin.T @ g_lin).double()
    cov = cov_z.double()
    cos = float((gtg * cov).sum() / (gtg.norm() * cov.norm()).clamp(min=1e-300))
    return {"theorem1_cosine": cos, "gtg_offdiag": offdiag_mass(gtg), "cov_offdiag": offdiag_mass(cov)}


class Diagnostics:
    """Running diagnostics fed by every tick.

    Examples
    --------
    >>> d = Diagnostics(embed_dim=3, window=16)
    >>> error = torch.tensor([float("nan"), 0.5])
    >>> d.observe(torch.tensor([1, 2]), error, torch.randn(2, 3), torch.randn(2, 4))
    >>> d.error_by_step()[2]
    0.5
    """

    def __init__(self, embed_dim: int, *, window: int = 512, max_step: int = 20, ema: float = 0.02) -> None:
        self.window, self.max_step, self.ema = window, max_step, ema
        self._z = torch.zeros(window, embed_dim, dtype=torch.float64)  # (W, D) ring buffer
        self._n = 0  # finite embeddings stored so far (the ring buffer's write position)
        self._seen = 0  # embeddings observed, finite or not
        self.nonfinite_embeddings = 0
        self._sum = torch.zeros(max_step + 1, dtype=torch.float64)  # index = step (last: >= max_step)
        self._count = torch.zeros(max_step + 1, dtype=torch.long)
        self._ema = torch.full((max_step + 1,), math.nan, dtype=torch.float64)
        self._repeat_sum = torch.zeros(max_step + 1, dtype=torch.float64)  # the repeat baseline's
        self._repeat_count = torch.zeros(max_step + 1, dtype=torch.long)
        self.h_norm = 0.0
        self.max_trace_radius = 0.0

    @torch.no_grad()
    def observe(
        self,
        step: torch.Tensor,
        error: torch.Tensor,
        z: torch.Tensor,
        h: torch.Tensor,
        radius: float = 0.0,
        repeat: torch.Tensor | None = None,
    ) -> None:
        """Record one tick: step (B,), error (B,) with NaN for unscored, embeddings z (B, D), states h (B, N),
        the largest spectral radius of a Jacobian block in the tick, and the repeat baseline's errors (B,)."""
        if repeat is not None:
            seen = ~torch.isnan(repeat)
            if seen.any():
                s = step[seen].clamp(max=self.max_step).cpu()
                self._repeat_sum.index_add_(0, s, repeat[seen].double().cpu())
                self._repeat_count.index_add_(0, s, torch.ones_like(s))
        ok = ~torch.isnan(error)
        if ok.any():
            s = step[ok].clamp(max=self.max_step).cpu()
            e = error[ok].double().cpu()
            self._sum.index_add_(0, s, e)
            self._count.index_add_(0, s, torch.ones_like(s))
            for si, ei in zip(s.tolist(), e.tolist(), strict=True):
                old = self._ema[si]
                self._ema[si] = ei if math.isnan(old) else (1 - self.ema) * old + self.ema * ei
        zc = z.detach().double().cpu()
        finite = torch.isfinite(zc).all(1)
        self.nonfinite_embeddings += int((~finite).sum())  # a diverged stream must not break the spectrum
        self._seen += zc.shape[0]
        zc = zc[finite][-self.window :]  # (B', D)
        self._z[(self._n + torch.arange(zc.shape[0])) % self.window] = zc
        self._n += zc.shape[0]
        self.h_norm = float(h.detach().norm(dim=-1).mean())
        self.max_trace_radius = float(radius)

    def error_by_step(self, *, recent: bool = False) -> dict[int, float]:
        """Mean error at each step within a sequence (key max_step means 'max_step or later').

        ``recent``: an exponential moving average instead of the mean since start.
        """
        out = {}
        for s in range(1, self.max_step + 1):
            if self._count[s] > 0:
                out[s] = float(self._ema[s]) if recent else float(self._sum[s] / self._count[s])
        return out

    def repeat_error_by_step(self) -> dict[int, float]:
        """Mean error of the repeat baseline at each step since start (keys as ``error_by_step``)."""
        return {
            s: float(self._repeat_sum[s] / self._repeat_count[s])
            for s in range(1, self.max_step + 1)
            if self._repeat_count[s] > 0
        }

    def embeddings(self) -> torch.Tensor:
        """The window of recent embeddings, oldest first: (W', D)."""
        n = min(self._n, self.window)
        if self._n <= self.window:
            return self._z[:n].clone()
        start = self._n % self.window
        return torch.cat([self._z[start:], self._z[:start]])

    def spectrum(self) -> torch.Tensor:
        z = self.embeddings()
        return covariance_spectrum(z) if z.shape[0] >= 2 else torch.zeros(z.shape[1], dtype=torch.float64)

    def summary(self, model: Any | None = None) -> dict[str, Any]:
        """Every diagnostic as plain numbers; with the model, also Theorem 1."""
        spec = self.spectrum()
        out: dict[str, Any] = {
            "effective_dim": participation_ratio(spec),
            "spectrum": spec.tolist(),
            "h_norm": self.h_norm,
            "max_trace_radius": self.max_trace_radius,
            "error_by_step": self.error_by_step(),
            "repeat_error_by_step": self.repeat_error_by_step(),
            "error_by_step_recent": self.error_by_step(recent=True),
            "embeddings_seen": self._seen,
            "nonfinite_embeddings": self.nonfinite_embeddings,
        }
        if model is not None and self._n >= 2:
            z = self.embeddings()
            zc = z - z.mean(0, keepdim=True)
            cov = zc.T @ zc / (z.shape[0] - 1)
            param = next(model.G.parameters())
            g_lin = predictor_jacobian(model.G, z.mean(0).to(param.device, param.dtype))
            out.update(theorem1(g_lin.cpu(), cov))
        return out
