"""An independent float64 reference: form R written out again, unrolled with autograd (BPTT).

It shares no code with ``learner.rgc`` or ``learner.rfp`` beyond reading the parameters, so a
mistake in the learner's forward pass or in its hand-written derivatives shows up as a mismatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from learner.model import RJEPA


def rgc_forward(
    model: RJEPA, u: torch.Tensor, h: torch.Tensor, c: torch.Tensor, k_full: torch.Tensor | None = None
):
    """One step of form R from the spec's boxed equations. ``k_full`` (N, N): a full h->tau_h matrix
    added to the element-wise gain (the negative control of spec section 3, item 9)."""
    rgc = model.rgc
    w_hh, w_ch, w_hc, w_cc = rgc.gains
    beta = rgc.biases if rgc.biases is not None else torch.zeros_like(rgc.gains)
    v = u if rgc.proj is None else u @ rgc.proj  # the fixed projection to K inputs, if any
    x = v @ rgc.W.T + rgc.b
    hh = w_hh * h + beta[0]
    if k_full is not None:
        hh = hh + h @ k_full.T
    tau_h = torch.tanh(hh)
    gam_h = torch.tanh(w_ch * c + beta[1])
    gam_c = torch.tanh(w_hc * h + beta[2])
    tau_c = torch.tanh(w_cc * c + beta[3])
    h_new = (1 - gam_h) * x + tau_h * h
    c_new = (1 - gam_c) * x + tau_c * c
    if rgc.phi == "tanh":
        h_new, c_new = torch.tanh(h_new), torch.tanh(c_new)
    return h_new, c_new


def embed(model: RJEPA, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """z = E [u; s(h)] (spec v2's context list), or E s(h) with ``embed_from='state'``; s(h) is the
    context whitening (h - mean) W written out again when the model has one, else h."""
    norm = model.context_norm
    if norm is not None:
        h = (h - norm.mean) @ norm.whiten
    h = h * model.cfg.embed_state_scale
    if model.cfg.embed_from == "context":
        if model.cfg.embed_pcs:  # the top components of u: u times the input whitening's basis
            u = u @ model.input_norm.basis
        e_u, e_h = model.E.weight[:, : u.shape[1]], model.E.weight[:, u.shape[1] :]
        return u @ e_u.T + h @ e_h.T
    return h @ model.E.weight.T


def predict(model: RJEPA, z: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """G(z), or with a preview v (B, F) G's hidden layer driven by Q (v - mean) W too (the preview
    whitening written out again; ``ModelConfig.preview_features``)."""
    if v is None:
        return model.G(z)
    norm = model.preview_norm
    drive = ((v - norm.mean) @ norm.whiten) @ model.Q.weight.T  # (B, H)
    g = model.G
    lin1, lin2 = (g.lin1, g.lin2) if hasattr(g, "lin1") else (g[0], g[2])
    out = lin2(torch.relu(lin1(z) + drive))
    return z + out if hasattr(g, "lin1") else out


def step_loss(
    model: RJEPA,
    u_prev: torch.Tensor,
    h_prev: torch.Tensor,
    u: torch.Tensor,
    h: torch.Tensor,
    floor: float = 0.0,
    v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of D(G(z(u_{t-1}, h_{t-1}); v_t), sg(z(u_t, h_t))) over the streams whose prediction and
    target both have a norm of at least ``floor`` (all of them at 0); ``v``: the raw previews of
    fixation t, or None."""
    p = predict(model, embed(model, u_prev, h_prev), v)
    z = embed(model, u, h).detach()
    ok = (p.detach().norm(dim=-1) >= floor) & (z.norm(dim=-1) >= floor)
    if model.cfg.loss == "cosine":
        per = 1 - F.cosine_similarity(p, z, dim=-1, eps=1e-12)
    elif model.cfg.loss == "whitened_mse":
        a = model.change_norm.whiten  # (D, D), held fixed by the test
        per = ((p - z) @ a).pow(2).sum(-1) / p.shape[-1]
    else:
        per = 0.5 * (p - z).pow(2).sum(-1)
    return (per * ok).sum() / max(int(ok.sum()), 1)


@torch.no_grad()
def smaller_norms(model: RJEPA, u: torch.Tensor) -> torch.Tensor:
    """min(|prediction|, |target|) of every scored (stream, step) of u (B, T, M), from zero state."""
    h = c = u.new_zeros(u.shape[0], model.cfg.n_units)
    out, prev = [], None
    for t in range(u.shape[1]):
        h_new, c = rgc_forward(model, u[:, t], h, c)
        if prev is not None:
            p = model.G(embed(model, u[:, t - 1], prev)).norm(dim=-1)
            out.append(torch.minimum(p, embed(model, u[:, t], h_new).norm(dim=-1)))
        prev = h = h_new
    return torch.stack(out)  # (T - 1, B)


def bptt_grads(
    model: RJEPA,
    u: torch.Tensor,
    *,
    k_full: torch.Tensor | None = None,
    floor: float = 0.0,
    previews: torch.Tensor | None = None,
) -> tuple[dict, list[dict]]:
    """Autograd gradients of L = sum_{t>=2} E_t for u (B, T, M) from zero state: (summed, per step).
    ``previews`` (B, T, F): the raw preview of each fixation, read by the prediction of it."""
    params = dict(model.named_parameters())
    names = [n for n in params if not n.startswith("trunk.")]
    B, T, _ = u.shape
    h = c = u.new_zeros(B, model.cfg.n_units)
    hs = []
    for t in range(T):
        h, c = rgc_forward(model, u[:, t], h, c, k_full)
        hs.append(h)
    per_step = []
    for t in range(1, T):
        v = previews[:, t] if previews is not None else None
        loss_t = step_loss(model, u[:, t - 1], hs[t - 1], u[:, t], hs[t], floor, v)
        g = torch.autograd.grad(loss_t, [params[n] for n in names], retain_graph=True, allow_unused=True)
        per_step.append(
            {
                n: (gi if gi is not None else torch.zeros_like(params[n]))
                for n, gi in zip(names, g, strict=True)
            }
        )
    summed = {n: sum(step[n] for step in per_step) for n in names}
    return summed, per_step


def split_groups(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name every RFP parameter group separately (rows of gains and biases are groups of their own)."""
    out = {}
    for name, g in grads.items():
        if name == "rgc.gains":
            out.update({f"w_{k}": g[i] for i, k in enumerate(("hh", "ch", "hc", "cc"))})
        elif name == "rgc.biases":
            out.update({f"beta_{k}": g[i] for i, k in enumerate(("hh", "ch", "hc", "cc"))})
        else:
            out[name] = g
    return out


def rel_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per group (e_norm, e_elem) of the spec's verification recipe."""
    out = {}
    for name in ref:
        diff = got[name] - ref[name]
        scale_n = float(ref[name].norm())
        scale_e = float(ref[name].abs().max())
        e_norm = float(diff.norm()) / scale_n if scale_n > 0 else float(diff.norm())
        e_elem = float(diff.abs().max()) / scale_e if scale_e > 0 else float(diff.abs().max())
        out[name] = (e_norm, e_elem)
    return out
