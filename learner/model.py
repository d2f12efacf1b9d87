"""R-JEPA: a frozen ResNet trunk (areas 1-5), the recurrent area 6 (RGC), embedding E, predictor G.

Velarde & Parra, arXiv 2411.16695; spec sections 1.1-1.4. At fixation t the model has seen patches
1..t; it predicts the embedding of fixation t+1 as ``G(E h_t)``, and is scored when that patch
arrives::

    E_{t+1} = D(G(E h_t), sg(E h_{t+1}))     D = 1 - cos (default) or 1/2 ||p - z||^2

The stop-gradient ``sg`` is on the target branch (SimSiam-style, no EMA target). The trunk never
learns; area 6 learns by RFP (``rfp.py``) or BPTT (``bptt.py``); E and G learn by ordinary
per-step backprop.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from learner.config import ModelConfig
from learner.rgc import RGC
from learner.trunk import build_trunk

log = logging.getLogger(__name__)


class InputNorm(nn.Module):
    """Whitens trunk features (ZCA) with running statistics of the inputs seen so far.

    ResNet features, random or pretrained, share a large common component and are strongly
    correlated (on OSIE patches a random resnet18's embedding has an effective dimensionality of
    about 4 of 120 before any learning). The cosine loss is then met by predicting the common
    direction. Whitening spreads the inputs (about 63 of 120 on the same data). The statistics depend
    on the inputs only, never on learned weights, so RFP stays exact: the whitened features are
    simply the inputs u_t of the recursion. The whitening matrix is recomputed after 1, 2, 4, ...
    updates, then every ``every`` updates, so its cost is amortised and the inputs drift slowly.
    """

    def __init__(self, features: int, *, window: int = 10_000, every: int = 256, eps: float = 1e-5) -> None:
        super().__init__()
        self.window, self.every, self.eps = window, every, eps
        self.register_buffer("mean", torch.zeros(features))  # (M,)
        self.register_buffer("cov", torch.eye(features))  # (M, M)
        self.register_buffer("whiten", torch.eye(features))  # (M, M) applied as (u - mean) @ whiten
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # inputs seen
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # batches seen

    @torch.no_grad()
    def forward(self, u: torch.Tensor, *, update: bool) -> torch.Tensor:
        """(B, M) -> (B, M). With ``update``, the batch joins the statistics before it is whitened."""
        if update:
            n = int(self.count) + u.shape[0]
            w = max(u.shape[0] / n, u.shape[0] / self.window)  # running average, then a moving one
            self.mean.lerp_(u.mean(0), w)
            d = u - self.mean  # (B, M)
            self.cov.lerp_(d.T @ d / u.shape[0], w)
            self.count.fill_(n)
            self.updates += 1
            k = int(self.updates)
            if (k & (k - 1) == 0 and k < self.every) or k % self.every == 0:
                self._recompute(n)
        return (u - self.mean) @ self.whiten

    def _recompute(self, n: int) -> None:
        m = self.cov.shape[0]
        # shrink towards a scaled identity while there are few samples (n < M makes cov singular)
        shrink = max(0.01, m / (n + 1)) * float(self.cov.diagonal().mean().clamp(min=self.eps))
        evals, evecs = torch.linalg.eigh(
            self.cov.double() + shrink * torch.eye(m, dtype=torch.float64, device=self.cov.device)
        )
        w = evecs @ torch.diag(evals.clamp(min=self.eps).rsqrt()) @ evecs.T
        self.whiten.copy_(w.to(self.whiten.dtype))


def prediction_loss(p: torch.Tensor, z: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-stream loss D(p, z): (B, D), (B, D) -> (B,). ``z`` should already be detached."""
    if kind == "cosine":
        return 1 - F.cosine_similarity(p, z, dim=-1, eps=1e-12)
    return 0.5 * (p - z).pow(2).sum(-1)


class RJEPA(nn.Module):
    """The whole model; the learners drive it one step at a time.

    Examples
    --------
    >>> cfg = ModelConfig(trunk="none", in_features=8, n_units=6, embed_dim=4, pred_hidden=5)
    >>> model = RJEPA(cfg)
    >>> u = model.encode(torch.randn(2, 8))          # identity trunk: features pass through
    >>> h, c, _ = model.rgc.step(u, model.zero_state(2), model.zero_state(2))
    >>> model.predict(h).shape
    torch.Size([2, 4])
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = build_trunk(cfg.trunk, cfg.trunk_weights, seed=cfg.seed, in_features=cfg.in_features)
        self.input_norm = InputNorm(cfg.M) if cfg.input_norm else None
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # trunk keeps seed; the rest its own stream
        self.rgc = RGC(
            cfg.M,
            cfg.n_units,
            phi=cfg.phi,
            gate_bias=cfg.gate_bias,
            init_scale=cfg.init_scale,
            generator=gen,
        )
        self.E = nn.Linear(cfg.n_units, cfg.embed_dim, bias=False)
        if cfg.predictor == "mlp":
            self.G: nn.Module = nn.Sequential(
                nn.Linear(cfg.embed_dim, cfg.pred_hidden),
                nn.ReLU(),
                nn.Linear(cfg.pred_hidden, cfg.embed_dim),
            )
        else:
            self.G = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        with torch.no_grad():
            for layer in [self.E, *self.G.modules()]:
                if isinstance(layer, nn.Linear):
                    _seeded_like_default(layer, gen)
        self.trunk_dtype = torch.float32

    # --- parameter groups -------------------------------------------------------------------
    def rfp_parameters(self) -> list[nn.Parameter]:
        """Area 6: trained by RFP (or BPTT)."""
        return [p for p in self.rgc.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        """E and G: trained by per-step backprop."""
        return list(self.E.parameters()) + list(self.G.parameters())

    def to_device(self, device: torch.device, dtype: torch.dtype = torch.float32) -> RJEPA:
        """Move the model; on CUDA the frozen trunk runs in bfloat16, everything else in ``dtype``."""
        self.to(device=device, dtype=dtype)
        if device.type == "cuda" and self.cfg.trunk != "none":
            self.trunk.to(dtype=torch.bfloat16)
            self.trunk_dtype = torch.bfloat16
        else:
            self.trunk_dtype = dtype
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

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        return self.E(h)  # (B, N) -> (B, D)

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        """Predicted embedding of the next fixation, G(E h): (B, N) -> (B, D)."""
        return self.G(self.E(h))

    def loss(self, h_prev: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Per-stream loss of predicting from ``h_prev`` the embedding of ``h`` (target detached): (B,)."""
        target = self.E(h).detach()  # sg(z_t)
        return prediction_loss(self.predict(h_prev), target, self.cfg.loss)

    def parameter_counts(self) -> dict[str, int]:
        return {
            "trunk": sum(p.numel() for p in self.trunk.parameters()),
            "rgc": sum(p.numel() for p in self.rgc.parameters()),
            "embedding": sum(p.numel() for p in self.E.parameters()),
            "predictor": sum(p.numel() for p in self.G.parameters()),
        }


def _seeded_like_default(layer: nn.Linear, gen: torch.Generator) -> None:
    """PyTorch's default Linear init (uniform in +-1/sqrt(fan_in)) drawn from ``gen``."""
    bound = 1.0 / layer.in_features**0.5
    for p in layer.parameters():
        p.uniform_(-bound, bound, generator=gen)
