"""Whitening with running statistics: the one statistical tool R-JEPA uses three times (the trunk
features, area 6's state in the context list, the changes that ``whitened_mse`` measures in), so
that no direction of a correlated, unevenly scaled vector dominates what the model learns from it.
"""

from __future__ import annotations

import torch
from torch import nn


class RunningWhitening(nn.Module):
    """ZCA whitening with running statistics of the vectors it has observed.

    Used twice in R-JEPA. On the trunk features (``cfg.input_norm``): ResNet features, random or
    pretrained, share a large common component and are strongly correlated (on OSIE patches a random
    resnet18's embedding has an effective dimensionality of about 4 of 120 without it), and the cosine
    loss is then met by predicting the common direction. On the recurrent state before the embedding
    (``cfg.context_norm``): the paper's Theorem 1 assumes a normalised context covariance
    (``<s s^T>`` proportional to I, spec 1.5); without it, once the RGC has learned to hold memory, the
    state is dominated by the few directions shared along a scanpath and the embedding collapses (about
    10 of 120 effective dimensions on OSIE after one pass, against about 55 with it).

    The statistics are not learned: they are constants of each step, so RFP stays exact (the
    gradient flows through the whitening as through a fixed linear map). They are updated only by
    ``observe`` (the learners call it once per learning tick), and the whitening matrix is recomputed
    after 1, 2, 4, ... observations, then every ``every``, so its cost is amortised.

    The mean is updated at every observation (``transform`` uses it). The covariance, which only the
    recomputes read, is updated lazily: the centred rows wait in a small buffer with their weights and
    join ``cov`` in one matrix product when the buffer is full and before a recompute. At one stream
    per tick this turns a rank-1 update of an F x F matrix per tick (memory-bound: the whole matrix
    read and written) into one rank-64 product every 64 ticks; the result is the same up to rounding.
    ``state_dict`` saves ``cov`` and the pending rows as they are (the rows in its extra state), never
    folding them: folding early rounds differently, so a checkpoint would change what is learned
    afterwards, and a run resumed from it would not continue bit for bit.
    """

    #: rows the covariance update waits for before it is applied
    PENDING_ROWS = 64
    #: wider than this, the whitening is diagonal while there are fewer samples than features
    DIAGONAL_BELOW = 1024

    mean: torch.Tensor
    cov: torch.Tensor
    whiten: torch.Tensor
    count: torch.Tensor
    updates: torch.Tensor
    basis: torch.Tensor  # (F, top), only when top > 0 (None otherwise)

    def __init__(
        self,
        features: int,
        *,
        window: int = 10_000,
        every: int = 256,
        eps: float = 1e-5,
        shrink: float = 0.01,
        sample_shrink: bool = True,
        top: int = 0,
    ) -> None:
        super().__init__()
        self.window, self.every, self.eps = window, every, eps
        self.shrink, self.sample_shrink = shrink, sample_shrink
        # ``top`` > 0: also keep the covariance's top eigenvectors (F, top) from each recompute
        # (``ModelConfig.embed_pcs``), each sign kept from the last recompute so that what they
        # span does not flip sign in the embedding
        self.top = top
        self.register_buffer("basis", torch.zeros(features, top) if top else None)
        self.register_buffer("mean", torch.zeros(features))  # (F,)
        self.register_buffer("cov", torch.eye(features))  # (F, F), without the pending rows
        self.register_buffer("whiten", torch.eye(features))  # (F, F) applied as (x - mean) @ whiten
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # n_seen, written by state_dict
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # n_batches, likewise
        # the lazy covariance update: the whole covariance is decay * cov + rows^T diag(weights) rows
        self._rows = torch.zeros(self.PENDING_ROWS, features)  # (R, F) centred vectors
        self._pending = 0
        self._decay = 1.0
        self._coef: list[float] = []  # row weight / decay at its arrival: weight = coef * decay now
        # the counters as Python ints (a tensor op costs microseconds at every tick); the buffers
        # above hold them for state_dict
        self.n_seen = 0  # vectors observed
        self.n_batches = 0  # observe calls

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # nn.Module.to/double/cuda: move the pending rows (plain attributes, not state) with the buffers
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        self._rows = fn(self._rows)
        return self

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Add a batch (B, F) to the statistics (a running average, then a moving one)."""
        b = x.shape[0]
        n = self.n_seen + b
        w = max(b / n, b / self.window)
        self.mean.lerp_(x[0] if b == 1 else x.mean(0), w)
        if self._pending + b > self.PENDING_ROWS:
            self.flush()
        if b > self.PENDING_ROWS or w > 0.5:  # a large batch, or the first ones: one product now
            d = x - self.mean  # (B, F)
            self.cov.addmm_(d.T, d, beta=1 - w, alpha=w / b)  # lerp towards d^T d / B
        else:
            k = self._pending
            torch.sub(x, self.mean, out=self._rows[k : k + b])  # (B, F) centred with the new mean
            self._decay *= 1 - w
            self._coef += [w / b / self._decay] * b
            self._pending = k + b
        self.n_seen, self.n_batches = n, self.n_batches + 1
        k = self.n_batches
        if (k & (k - 1) == 0 and k < self.every) or k % self.every == 0:
            self._recompute(n)

    @torch.no_grad()
    def flush(self) -> None:
        """Fold the pending rows into ``cov``."""
        k = self._pending
        if not k:
            return
        rows = self._rows[:k]
        weights = torch.tensor(self._coef, dtype=rows.dtype, device=rows.device).mul_(self._decay)  # (k,)
        self.cov.addmm_((rows * weights[:, None]).T, rows, beta=self._decay)
        self._pending, self._decay, self._coef = 0, 1.0, []

    @torch.no_grad()
    def covariance(self) -> torch.Tensor:
        """The whole covariance (F, F), pending rows included, as a new tensor: nothing is folded."""
        k = self._pending
        if not k:
            return self.cov.clone()
        rows = self._rows[:k]
        weights = torch.tensor(self._coef, dtype=rows.dtype, device=rows.device).mul_(self._decay)  # (k,)
        return torch.addmm(self.cov, (rows * weights[:, None]).T, rows, beta=self._decay)

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        k = self._pending
        return {
            "rows": self._rows[:k].clone(),  # (k, F)
            "coef": torch.tensor(self._coef, dtype=torch.float64),  # (k,): Python floats, kept exactly
            "decay": torch.tensor(self._decay, dtype=torch.float64),
        }

    def set_extra_state(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is None:  # a state dict from before the pending rows were saved: cov is the whole covariance
            self._pending, self._decay, self._coef = 0, 1.0, []
            return
        k = state["rows"].shape[0]
        self._rows[:k] = state["rows"].to(self._rows)
        self._pending, self._decay, self._coef = k, float(state["decay"]), state["coef"].tolist()

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        self.count.fill_(self.n_seen)
        self.updates.fill_(self.n_batches)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        state_dict.setdefault(prefix + "_extra_state", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.n_seen, self.n_batches = int(self.count), int(self.updates)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, F) whitened; differentiable with respect to x (the statistics are constants)."""
        return (x - self.mean) @ self.whiten

    def forward(self, x: torch.Tensor, *, update: bool) -> torch.Tensor:
        """Inputs: with ``update``, the batch joins the statistics before it is whitened; no gradient."""
        with torch.no_grad():
            if update:
                self.observe(x)
            return self.transform(x)

    def _recompute(self, n: int) -> None:
        self.flush()
        if n < 2:  # one vector is its own mean: a zero covariance, nothing to scale by yet
            return
        m = self.cov.shape[0]
        # shrink towards a scaled identity: by ``shrink`` of the mean variance, and with
        # ``sample_shrink`` by more while there are few samples (n < F makes cov singular)
        ratio = max(self.shrink, m / (n + 1)) if self.sample_shrink else self.shrink
        shrink = ratio * float(self.cov.diagonal().mean().clamp(min=self.eps))
        # in the statistics' own dtype: float32 halves the eigendecomposition's time, and the shrinkage
        # keeps the matrix far better conditioned than float32's precision needs
        if ratio >= 1 and m > self.DIAGONAL_BELOW:
            # fewer samples than features: the shrinkage outweighs the sample covariance, so scale by
            # the variances alone, and spare a fresh worker an M x M eigendecomposition (about a
            # second at M = 1752 on a CPU core) at each of the first power-of-two counts
            var = self.cov.diagonal() + shrink
            self.whiten.copy_(torch.diag(var.clamp(min=self.eps).rsqrt()))
            if self.top:
                self._keep_top(torch.linalg.eigh(self.cov)[1])
            return
        cov = self.cov + shrink * torch.eye(m, dtype=self.cov.dtype, device=self.cov.device)
        evals, evecs = torch.linalg.eigh(cov)
        self.whiten.copy_((evecs * evals.clamp(min=self.eps).rsqrt()) @ evecs.T)
        if self.top:
            self._keep_top(evecs)

    def _keep_top(self, evecs: torch.Tensor) -> None:
        """``basis`` <- the last ``top`` eigenvectors (ascending order: the largest), signed like the
        previous basis."""
        new = evecs[:, -self.top :]  # (F, top)
        sign = torch.where((new * self.basis).sum(0) < 0, -1.0, 1.0).to(new.dtype)  # (top,)
        self.basis.copy_(new * sign)


__all__ = ["RunningWhitening"]
