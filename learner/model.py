"""R-JEPA: a frozen trunk (areas 1-5), the recurrent area 6 (RGC), embedding E, predictor G.

Velarde & Parra, arXiv 2411.16695; spec sections 1.1-1.4 and 1.6 (v2). At fixation t the model
has seen patches 1..t. Its embedding is a linear projection of the *context list*: the pooled,
whitened trunk features of the patch now fixated, u_t, and the whitened state of area 6, s(h_t)::

    z_t = E [u_t; s(h_t)]          (``embed_from='context'``; ``'state'``: z_t = E s(h_t), spec v1)

It predicts the embedding of fixation t+1 as ``G(z_t)`` and is scored when that patch arrives::

    E_{t+1} = D(G(z_t), sg(z_{t+1}))     D: ``whitened_mse`` (default), 1 - cos, or 1/2 ||p - z||^2

With ``cfg.preview_features`` > 0 the prediction also reads a preview v_{t+1} of the next
fixation, known before it lands (its region as the periphery sees it, the saccade): the predictor's
hidden layer gets a learned projection Q n(v_{t+1}) of the whitened preview, ``G(z_t; v_{t+1})``. It
feeds the predictor only, so the loss still reaches the RGC only through h_t.

The stop-gradient ``sg`` is on the target branch (SimSiam-style, no EMA target). The loss reaches
the RGC only through h_t (u_t is frozen trunk output), so RFP stays exact. Reading u_t keeps the
target fast: with s(h_t) alone the RGC learns to close its input gates and "predict the current
embedding again" becomes optimal (spec 1.6, the slowness collapse). The trunk never learns; area 6
learns by RFP (``rfp.py``) or BPTT (``bptt.py``); E and G learn by ordinary per-step backprop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from learner.config import ModelConfig
from learner.rgc import RGC
from learner.trunk import build_trunk
from learner.whitening import RunningWhitening

log = logging.getLogger(__name__)

#: Shrinkage of ``whitened_mse``'s change whitening towards a scaled identity (of the mean variance):
#: it bounds how much a direction in which the embedding barely changes is amplified.
CHANGE_SHRINK = 0.02
#: ``whitened_mse`` uses its full change whitening once it has seen this many times D changes
CHANGE_WHITEN_AFTER = 4
#: ``whitened_mse`` learns once its metric has seen this many changes (counted once the input and
#: context whitenings have settled: 16 observations, after their recomputes at 1, 2, 4, 8 and 16)
CHANGE_READY = 8


class ResidualPredictor(nn.Module):
    """G(z) = z + G2 relu(G1 z + g1) + g2, with G2 and g2 zero at start.

    At initialisation the model predicts that the next embedding is the current one (the paper's
    "predict the current embedding again" baseline), and learning can only improve on it; a plain MLP
    starts from a random map and, at the service's learning rates, stays worse than that baseline for
    thousands of fixations.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, z: torch.Tensor, drive: torch.Tensor | None = None) -> torch.Tensor:
        """``drive`` (B, H): an extra input of the hidden layer (the preview's, ``RJEPA.predictor``)."""
        pre = self.lin1(z)
        return z + self.lin2(torch.relu(pre if drive is None else pre + drive))


@dataclass
class Scores:
    """What a tick learns about each scored fixation, one row per stream."""

    error: torch.Tensor  # (B,) D(G(z_{t-1}), z_t): the model's prediction error
    repeat: torch.Tensor  # (B,) D(z_{t-1}, z_t): the "repeat the current embedding" baseline
    ok: torch.Tensor  # (B,) bool: well-conditioned, so the row's gradient is used (``well_conditioned``)
    change: torch.Tensor  # (B, D) z_t - z_{t-1}, what ``RJEPA.observe_change`` learns the metric from

    def put(self, rows: torch.Tensor | slice | list[int], other: Scores) -> None:
        """Write ``other``'s rows into ``rows`` of these scores."""
        self.error[rows], self.repeat[rows] = other.error, other.repeat
        self.ok[rows], self.change[rows] = other.ok, other.change


def well_conditioned(p: torch.Tensor, z: torch.Tensor, min_norm: float) -> torch.Tensor:
    """Rows (B,) whose prediction p and target z (B, D) both have norm >= ``min_norm * sqrt(D)``.

    The cosine loss's gradient with respect to p is (cos p^ - z^) / |p|: a prediction near zero
    (a fresh model's first scored tick: the whitenings have seen one vector and a residual
    predictor starts at the identity) gives gradients of 1e11-1e14, which Adam's second moment then
    keeps for tens of thousands of ticks, freezing the parameters they touch (spec 1.6). Such
    rows are scored but not learned from; ``TickOutput.skipped`` counts them.
    """
    floor = min_norm * p.shape[-1] ** 0.5
    return (p.norm(dim=-1) >= floor) & (z.norm(dim=-1) >= floor)


def prediction_loss(
    p: torch.Tensor, z: torch.Tensor, kind: str, metric: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-stream loss D(p, z): (B, D), (B, D) -> (B,). ``z`` should already be detached.

    ``whitened_mse`` needs ``metric`` (D, D), the whitening of the embedding's changes between
    consecutive fixations (``RJEPA.change_norm``): ``|(p - z) metric|^2 / D``.
    """
    if kind == "cosine":
        return 1 - F.cosine_similarity(p, z, dim=-1, eps=1e-12)
    if kind == "whitened_mse":
        assert metric is not None
        return ((p - z) @ metric).pow(2).sum(-1) / p.shape[-1]
    return 0.5 * (p - z).pow(2).sum(-1)


class RJEPA(nn.Module):
    """The whole model; the learners drive it one step at a time.

    Examples
    --------
    >>> cfg = ModelConfig(trunk="none", in_features=8, n_units=6, embed_dim=4, pred_hidden=5)
    >>> model = RJEPA(cfg)
    >>> u = model.encode(torch.randn(2, 8))          # identity trunk: features pass through
    >>> h, c, _ = model.rgc.step(u, model.zero_state(2), model.zero_state(2))
    >>> model.predict(u, h).shape
    torch.Size([2, 4])
    """

    change_sq: torch.Tensor  # (2,) whitened_mse: running mean of |change|^2 / D, and changes counted

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = build_trunk(cfg.trunk, cfg.trunk_weights, seed=cfg.seed, in_features=cfg.in_features)
        # an M x M eigendecomposition per recompute (about a second at M = 1752 on a CPU core), so
        # only every 4096 observations once the first ones are in: the trunk's feature statistics
        # settle early (the cost per tick: docs/results.md, "Learner speed and memory").
        self.input_norm = (
            RunningWhitening(cfg.M, every=4096 if cfg.M > 1024 else 256, top=cfg.embed_pcs)
            if cfg.input_norm
            else None
        )
        # the state's statistics drift as the RGC learns to hold memory: a shorter window, recomputed
        # more often (every 128 learning ticks, an N x N eigendecomposition each).
        # A fixed shrinkage of 2% of the mean variance: once the RGC has closed most units' input gates,
        # the state has a few dozen directions of large variance and hundreds of small ones, and a
        # shrinkage large while few states are seen keeps the small ones unamplified, so that the
        # embedding loses dimensions (docs/results.md, "the context whitening's shrinkage").
        self.context_norm = (
            RunningWhitening(cfg.n_units, window=2000, every=128, shrink=0.02, sample_shrink=False)
            if cfg.context_norm
            else None
        )
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # trunk keeps seed; the rest its own stream
        self.rgc = RGC(
            cfg.M,
            cfg.n_units,
            inputs=cfg.K,
            phi=cfg.phi,
            gate_bias=cfg.gate_bias,
            init_scale=cfg.init_scale,
            generator=gen,
        )
        # ``whitened_mse``: squared error measured in units of the embedding's typical change between
        # consecutive fixations (the running whitening of z_t - z_{t-1}). "Repeat the current
        # embedding" then scores about 1 in every direction, whatever E does: the loss cannot be
        # lowered by making the embedding slow (spec 1.6) or small (E -> 0), only by predicting the
        # change. Its statistics are constants of each step, like the context whitening's.
        # Until it has seen CHANGE_WHITEN_AFTER x D changes its covariance is poorly estimated, so the
        # metric is then the identity over the changes' root-mean-square (``change_sq``: a running
        # mean of |change|^2 / D over the last ~500 changes and their count; a buffer, so that
        # checkpoints resume exactly).
        self.change_norm = (
            RunningWhitening(cfg.embed_dim, window=2000, every=64, shrink=CHANGE_SHRINK)
            if cfg.loss == "whitened_mse"
            else None
        )
        self.register_buffer("change_sq", torch.zeros(2) if self.change_norm is not None else None)
        self.context_features = cfg.M if cfg.embed_from == "context" else 0  # width of u kept per stream
        self.embed_features = cfg.embed_pcs or self.context_features  # width of the patch's part of kappa
        self.E = nn.Linear(self.embed_features + cfg.n_units, cfg.embed_dim, bias=False)  # (D, M + N)
        if cfg.predictor == "mlp":
            self.G: nn.Module = nn.Sequential(
                nn.Linear(cfg.embed_dim, cfg.pred_hidden),
                nn.ReLU(),
                nn.Linear(cfg.pred_hidden, cfg.embed_dim),
            )
        elif cfg.predictor == "residual":
            self.G = ResidualPredictor(cfg.embed_dim, cfg.pred_hidden)
        else:
            self.G = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        with torch.no_grad():
            for layer in [self.E, *self.G.modules()]:
                if isinstance(layer, nn.Linear):
                    _seeded_like_default(layer, gen)
            if isinstance(self.G, ResidualPredictor):
                self.G.lin2.weight.zero_()
                self.G.lin2.bias.zero_()
        # the preview (cfg.preview_features): whitened like the trunk features (a running ZCA), then
        # projected into the predictor's hidden layer by Q, which starts at zero: a random Q's drive
        # (unit-variance inputs) outweighed G1 z in the hidden units, and on the OSIE controls the
        # model then learned more slowly than without the preview (docs/results.md). At zero, the
        # untrained model is the same as without it, and Q grows where the gradient says the preview
        # helps (it gets one as soon as G2 has moved from zero, after the first step).
        f = cfg.preview_features
        self.preview_norm = RunningWhitening(f, every=4096 if f > 1024 else 256) if f else None
        self.Q = nn.Linear(f, cfg.pred_hidden, bias=False) if f else None  # (H, F)
        if self.Q is not None:
            nn.init.zeros_(self.Q.weight)
        self.trunk_dtype = torch.float32

    # --- parameter groups -------------------------------------------------------------------
    def rfp_parameters(self) -> list[nn.Parameter]:
        """Area 6: trained by RFP (or BPTT)."""
        return [p for p in self.rgc.parameters()]

    def gain_parameters(self) -> list[nn.Parameter]:
        """The RGC's element-wise gains and gate biases (a subset of ``rfp_parameters``)."""
        return [self.rgc.gains] + ([self.rgc.biases] if self.rgc.biases is not None else [])

    def head_parameters(self) -> list[nn.Parameter]:
        """E, G and the preview's projection Q: trained by per-step backprop."""
        preview = list(self.Q.parameters()) if self.Q is not None else []
        return list(self.E.parameters()) + list(self.G.parameters()) + preview

    def to_device(
        self,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        *,
        trunk_dtype: torch.dtype | None = None,
    ) -> RJEPA:
        """Move the model; everything but the frozen trunk in ``dtype``. The trunk runs in
        ``trunk_dtype``: by default bfloat16 on CUDA and ``dtype`` elsewhere."""
        self.to(device=device, dtype=dtype)
        if trunk_dtype is None:
            trunk_dtype = torch.bfloat16 if device.type == "cuda" and self.cfg.trunk != "none" else dtype
        self.trunk.to(dtype=trunk_dtype)
        self.trunk_dtype = trunk_dtype
        return self

    # --- computation -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk features u: (B, 3, P, P) normalised patches (or (B, M) with trunk 'none') -> (B, M)."""
        dtype = self.rgc.W.dtype
        return self.trunk(x.to(self.trunk_dtype)).to(dtype)

    def normalize(self, u: torch.Tensor, *, update: bool) -> torch.Tensor:
        """Trunk features -> the RGC's inputs (standardised when ``cfg.input_norm``): (B, M)."""
        return self.input_norm(u, update=update) if self.input_norm is not None else u

    def zero_state(self, batch: int) -> torch.Tensor:
        return self.rgc.W.new_zeros(batch, self.cfg.n_units)  # (B, N)

    def context(self, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The context list kappa = [u; s(h)] that E projects (or s(h) alone with ``embed_from='state'``):
        (B, M), (B, N) -> (B, M + N). s(h) is h whitened when ``cfg.context_norm``; with
        ``cfg.embed_pcs`` the patch's part is u V (B, K_e), with ``cfg.embed_state_scale`` A the
        state's A s(h)."""
        s = self.context_norm.transform(h) if self.context_norm is not None else h  # (B, N)
        if self.cfg.embed_state_scale != 1:
            s = s * self.cfg.embed_state_scale
        return torch.cat([self.patch_part(u), s], 1) if self.context_features else s

    def patch_part(self, u: torch.Tensor) -> torch.Tensor:
        """The patch's part of kappa: the whitened u (B, M), or its top components u V (B, K_e)."""
        if self.cfg.embed_pcs:
            assert self.input_norm is not None and self.input_norm.basis is not None
            return u @ self.input_norm.basis  # (B, K_e)
        return u

    def embed(self, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """z = E kappa: (B, M), (B, N) -> (B, D)."""
        return self.E(self.context(u, h))

    def observe_context(self, h: torch.Tensor) -> None:
        """Let the context whitening see this tick's new states (B, N); the learners call it once per
        learning tick, after the tick's gradient, so a tick's loss uses the statistics before it."""
        if self.context_norm is not None:
            self.context_norm.observe(h)

    def normalize_preview(self, v: torch.Tensor, *, update: bool) -> torch.Tensor:
        """Previews (B, F) -> whitened (B, F); with ``update`` they join the statistics first."""
        assert self.preview_norm is not None, "this model has no preview (cfg.preview_features = 0)"
        return self.preview_norm(v, update=update)

    def predictor(self, z: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        """G(z; v): (B, D), whitened previews (B, F) or None -> (B, D). Without a preview (None, or a
        model without one) this is G(z): the hidden layer's preview drive is then 0, the drive of
        the mean preview."""
        if v is None or self.Q is None:
            return self.G(z)
        drive = self.Q(v)  # (B, H)
        if isinstance(self.G, ResidualPredictor):
            return self.G(z, drive)
        assert isinstance(self.G, nn.Sequential), "a preview needs the MLP or residual predictor"
        lin1, act, lin2 = self.G  # the MLP (ModelConfig refuses a preview with the linear predictor)
        return lin2(act(lin1(z) + drive))

    def predict(self, u: torch.Tensor, h: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted embedding of the next fixation, G(z(u, h); v): (B, M), (B, N)[, (B, F)] -> (B, D)."""
        return self.predictor(self.embed(u, h), v)

    def loss(
        self,
        u_prev: torch.Tensor,
        h_prev: torch.Tensor,
        u: torch.Tensor,
        h: torch.Tensor,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-stream loss of predicting from (u_prev, h_prev) and the preview v of (u, h) the
        embedding of (u, h) (detached): (B,)."""
        target = self.embed(u, h).detach()  # sg(z_t)
        return self.distance(self.predict(u_prev, h_prev, v), target)

    def distance(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The loss D(p, z) of ``cfg.loss``: (B, D), (B, D) -> (B,)."""
        return prediction_loss(p, z, self.cfg.loss, self.change_metric())

    def change_metric(self) -> torch.Tensor | None:
        """``whitened_mse``'s metric A (D, D): the change whitening once it has seen
        ``CHANGE_WHITEN_AFTER * D`` changes; before, the identity over their root-mean-square (the
        identity before any); None for the other losses."""
        norm = self.change_norm
        if norm is None:
            return None
        if norm.n_seen >= CHANGE_WHITEN_AFTER * self.cfg.embed_dim:
            return norm.whiten
        eye = torch.eye(self.cfg.embed_dim, dtype=norm.whiten.dtype, device=norm.whiten.device)
        mean_sq, count = self.change_sq.tolist()
        return eye if not count else eye * max(mean_sq, 1e-12) ** -0.5

    def learnable(self, p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Rows (B,) a learner may learn from: well-conditioned, and the loss's metric is ready."""
        ok = well_conditioned(p, target, self.cfg.min_norm)
        return ok if self.metric_ready() else torch.zeros_like(ok)

    def metric_ready(self) -> bool:
        """Whether the loss's metric can be learned from: ``whitened_mse`` needs ``CHANGE_READY``
        changes first (before, its scale is arbitrary: a fresh model's gradients reached 1e5 and
        more, and Adam's second moment then froze the parameters they touched, as a zero cosine
        prediction did)."""
        return self.change_norm is None or bool(self.change_sq[1] >= CHANGE_READY)

    def observe_change(self, scores: Scores) -> None:
        """Let the metric of ``whitened_mse`` see this tick's changes z_t - z_{t-1} of the scored
        fixations; the learners call it once per learning tick, after the tick's gradient."""
        norm = self.change_norm
        if norm is None:
            return
        if any(w is not None and w.n_batches < 16 for w in (self.input_norm, self.context_norm)):
            return  # their first recomputes rescale u and s(h) wholesale: no change is typical yet
        change = scores.change[~scores.error.isnan()]  # (Bs, D)
        if not change.shape[0]:
            return
        before = norm.n_seen
        norm.observe(change)
        switch = CHANGE_WHITEN_AFTER * self.cfg.embed_dim
        if before < switch <= norm.n_seen:
            norm._recompute(norm.n_seen)  # the whitening takes over from statistics of this many
        b, count = change.shape[0], float(self.change_sq[1]) + change.shape[0]
        weight = max(b / count, b / 500)
        self.change_sq[0] += weight * (float(change.pow(2).mean()) - float(self.change_sq[0]))
        self.change_sq[1] = count

    @torch.no_grad()
    def scores(
        self,
        u_prev: torch.Tensor,
        h_prev: torch.Tensor,
        u: torch.Tensor,
        h: torch.Tensor,
        v: torch.Tensor | None = None,
    ) -> Scores:
        """The model's error, the repeat baseline's error, and which rows are well-conditioned."""
        z_prev, target = self.embed(u_prev, h_prev), self.embed(u, h)  # (B, D) each
        p = self.predictor(z_prev, v)
        metric = self.change_metric()
        return Scores(
            prediction_loss(p, target, self.cfg.loss, metric),
            prediction_loss(z_prev, target, self.cfg.loss, metric),
            self.learnable(p, target),
            target - z_prev,
        )

    def parameter_counts(self) -> dict[str, int]:
        return {
            "trunk": sum(p.numel() for p in self.trunk.parameters()),
            "rgc": sum(p.numel() for p in self.rgc.parameters()),
            "embedding": sum(p.numel() for p in self.E.parameters()),
            "predictor": sum(p.numel() for p in self.G.parameters())
            + (self.Q.weight.numel() if self.Q is not None else 0),
        }


def _seeded_like_default(layer: nn.Linear, gen: torch.Generator) -> None:
    """PyTorch's default Linear init (uniform in +-1/sqrt(fan_in)) drawn from ``gen``."""
    bound = 1.0 / layer.in_features**0.5
    for p in layer.parameters():
        p.uniform_(-bound, bound, generator=gen)
