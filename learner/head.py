"""The head's backward pass written by hand: what RFP needs from the loss at every fixation.

At each scored fixation RFP needs delta = dE/dh_{t-1} (docs/math.md, section 4), which is backprop
through the head only: the context whitening, the embedding E and the predictor G, then the loss.
At one stream per tick autograd's graph cost as much as the arithmetic, so for the head that
``RJEPA`` builds (E linear without bias, G the residual or the MLP predictor, the losses of
``model.prediction_loss``) it is written out here in a few matrix products. It computes the same
numbers as autograd through ``RJEPA.loss``: the exactness tests check RFP (with this head) against
an independent autograd reference in float64, and ``test_fast_paths`` checks it against the
autograd head of ``RFPLearner(head="autograd")``.

Which backward a learner uses is one explicit choice, ``RFPLearner(head=...)``: ``"auto"`` takes
this one exactly when ``supports(model)``, i.e. the model is a plain ``RJEPA`` (not a subclass,
which may have changed any part of the forward pass) with the residual or MLP predictor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from learner.config import ModelConfig
from learner.model import RJEPA, ResidualPredictor, Scores, prediction_loss
from learner.streaming import grad_of
from learner.whitening import RunningWhitening


@dataclass(frozen=True)
class HandHead:
    """The head as ``backward`` differentiates it: p = [z +] lin2(relu(lin1(z) [+ q v])), z = E kappa,
    kappa = [u; s] (or s alone when ``context`` is 0), s = the state h, whitened by ``norm`` when
    there is one."""

    e: nn.Linear
    lin1: nn.Linear
    lin2: nn.Linear
    residual: bool
    norm: RunningWhitening | None
    context: int  # M (or K_e), the width of the patch's part of kappa (0: the state alone)
    q: nn.Linear | None  # the preview's projection into the hidden layer (cfg.preview_features > 0)
    model: RJEPA  # for whitened_mse's metric (``RJEPA.change_metric``) and whether it is ready


def supports(model: RJEPA) -> bool:
    """Whether ``backward`` computes this model's head: a plain RJEPA with the residual or MLP
    predictor (the linear predictor, and any subclass, go through autograd)."""
    return type(model) is RJEPA and model.cfg.predictor in ("residual", "mlp")


def hand_head(model: RJEPA) -> HandHead:
    """The layers ``backward`` reads, for a model that ``supports`` accepts."""
    assert supports(model)
    g = model.G
    layers = (g.lin1, g.lin2) if isinstance(g, ResidualPredictor) else (g[0], g[2])  # type: ignore[index]
    lin1, lin2 = layers
    assert isinstance(lin1, nn.Linear) and isinstance(lin2, nn.Linear)
    residual = isinstance(g, ResidualPredictor)
    norm, context = model.context_norm, model.embed_features
    return HandHead(model.E, lin1, lin2, residual, norm, context, model.Q, model)


@torch.no_grad()
def backward(
    head: HandHead,
    cfg: ModelConfig,
    u_prev: torch.Tensor,
    h_prev: torch.Tensor,
    u: torch.Tensor,
    h: torch.Tensor,
    v: torch.Tensor | None = None,
) -> tuple[Scores, torch.Tensor]:
    """Scores of D(G(z(u_prev, h_prev); v), sg(z(u, h))) per stream, and the gradient of their mean, by hand.

    The mean is taken over the rows ``RJEPA.learnable`` keeps (well-conditioned); the others give
    no gradient. Adds the gradients of E and of G's two layers to their ``.grad`` and returns
    d(mean)/d h_prev (Bs, N). Same values as autograd through ``model.loss`` up to rounding (the
    exactness tests compare RFP with an autograd BPTT reference in float64). The context whitening,
    when there is one, is a constant linear map of each step: s = (h - mean) @ whiten. ``v`` (Bs, F):
    the whitened previews of the fixations scored, when the model has a preview (else ignored);
    they reach the hidden layer only, so Q gets a gradient and delta does not change its form.
    """
    e, lin1, lin2, norm = head.e.weight, head.lin1, head.lin2, head.norm  # e: (D, M + N) or (D, N)
    w1, b1, w2, b2 = lin1.weight, lin1.bias, lin2.weight, lin2.bias  # (H, D), (H,), (D, H), (D,)
    bs = h_prev.shape[0]
    both = torch.cat([h_prev, h])  # (2 Bs, N): the context's state and the target's, in one pass
    s_both = norm.transform(both) if norm is not None else both
    scale = cfg.embed_state_scale
    if scale != 1:
        s_both = s_both * scale
    if head.context:
        patch = head.model.patch_part(torch.cat([u_prev, u]))  # (2 Bs, M), or (2 Bs, K_e) u V
        s_both = torch.cat([patch, s_both], 1)  # (2 Bs, M + N): kappa = [u; s]
    z_both = s_both @ e.t()  # (2 Bs, D)
    k_prev, z, target = s_both[:bs], z_both[:bs], z_both[bs:]  # target: sg(z_t)
    pre = torch.addmm(b1, z, w1.t())  # (Bs, H)
    preview = (head.q.weight, v) if head.q is not None and v is not None else None  # (H, F), (Bs, F)
    if preview is not None:
        pre.addmm_(preview[1], preview[0].t())  # + Q v: the preview's drive
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
    grad_of(w2).addmm_(g_p.t(), hidden)  # (D, H)
    grad_of(b2).add_(g_p.sum(0))
    g_pre = (g_p @ w2).mul_(pre > 0)  # (Bs, H), through the ReLU
    grad_of(w1).addmm_(g_pre.t(), z)  # (H, D)
    grad_of(b1).add_(g_pre.sum(0))
    if preview is not None:
        grad_of(preview[0]).addmm_(g_pre.t(), preview[1])  # (H, F)
    g_z = g_pre @ w1  # (Bs, D)
    if head.residual:
        g_z.add_(g_p)
    if e.requires_grad:  # E is fixed at embed_lr_scale 0
        grad_of(e).addmm_(g_z.t(), k_prev)  # (D, M + N)
    delta = g_z @ e[:, head.context :]  # (Bs, N): only the state part of kappa reaches the RGC
    if scale != 1:
        delta = delta * scale
    delta = delta @ norm.whiten.t() if norm is not None else delta
    return Scores(per_stream, repeat, ok, target - z), delta
