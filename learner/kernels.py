"""Same numbers, faster: the learners' speed tricks, kept apart from the math.

Each function here computes exactly what a plainer expression would (the plain form is in its
docstring); ``tests/learner/test_fast_paths.py`` checks each against it. What the numbers mean is
in ``rfp.py`` and ``docs/math.md``.

* ``advance_w_traces``: RFP's gradient read and trace recursion for the large ``[W | b]`` slab, in
  place, one stream at a time on the CPU (two passes over a stream's traces instead of four), or all
  streams of the tick in one batched pass (CUDA);
* ``mix``: the per-unit 2x2 blocks times a slab of trace pairs, batched;
* ``FusedAdamStep``: ``torch.optim.Adam.step()`` as the two fused kernel calls it comes down to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from learner.slab import Slab


def mix(p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per-unit 2x2 blocks times the trace pairs: p (B, 2, N, X), a (B, N, 2, 2) -> a new (B, 2, N, X).

    Plain form: ``torch.einsum("bnij,bjnx->binx", a, p)``.
    """
    col_h = a[..., 0].transpose(1, 2).unsqueeze(-1)  # (B, 2, N, 1): [a_hh; a_ch]
    col_c = a[..., 1].transpose(1, 2).unsqueeze(-1)  # (B, 2, N, 1): [a_hc; a_cc]
    return (col_h * p[:, :1]).addcmul_(col_c, p[:, 1:])


@torch.no_grad()
def advance_w_traces(
    trace_w: Slab | torch.Tensor,
    slots: torch.Tensor,
    idx: torch.Tensor,
    delta: torch.Tensor | None,
    a: torch.Tensor,
    k: torch.Tensor,
    v1: torch.Tensor,
    w_grad: torch.Tensor,
    b_grad: torch.Tensor,
    scratch: torch.Tensor,
    *,
    batched: bool,
) -> None:
    """Add the scored rows' gradient of ``[W | b]`` and advance its traces, in place.

    ``trace_w`` (S, 2, N, K+1) every slot's traces (a chunked ``Slab``, indexed by slot); ``slots``
    (B,) this tick's; ``idx`` (Bs,) the scored rows of the tick and ``delta`` (Bs, N) their
    dE/dh_{t-1}; ``a`` (B, N, 2, 2) the blocks, ``k`` (B, 2, N) the drive's factors, ``v1`` (B, K+1)
    the input [v, 1]; ``scratch`` (N, 2, K+1).
    Plain form::

        p = trace_w[slots]                                   # the traces of step t-1
        g = einsum("bn,bnm->nm", delta, p[idx, 0])           # (N, K+1)
        w_grad += g[:, :K];  b_grad += g[:, K]
        trace_w[slots] = mix(p, a) + k[..., None] * v1[:, None, None, :]
    """
    m = v1.shape[1] - 1
    if batched:
        sel = slice(None) if idx.numel() == len(slots) else idx
        p_w = trace_w[slots]  # (B, 2, N, K+1), a copy
        if delta is not None:
            g_w = torch.einsum("bn,bnm->nm", delta, p_w[sel, 0])  # (N, K+1)
            w_grad.add_(g_w[:, :m])
            b_grad.add_(g_w[:, m])
        trace_w[slots] = mix(p_w, a).addcmul_(k[..., None], v1[:, None, None, :])
        return
    deltas = {} if delta is None else dict(zip(idx.tolist(), delta.unbind(0), strict=True))  # row -> (N,)
    k_units = k.transpose(1, 2).unsqueeze(-1)  # (B, N, 2, 1): [k_h, k_c] of each unit
    for i, s in enumerate(slots.tolist()):
        p = trace_w[s]  # (2, N, K+1), a view into the slab
        d = deltas.get(i)
        if d is not None:  # straight into .grad, while this stream's P^h is still that of t-1
            w_grad.addcmul_(p[0, :, :m], d[:, None])
            b_grad.addcmul_(p[0, :, m], d)
        # per unit n: [P^h; P^c]_n <- a_n [P^h; P^c]_n + [k_h; k_c]_n v1^T, as one batched product of
        # N 2x2 blocks (one pass over the traces), then the outer product on the way back
        units = p.permute(1, 0, 2)  # (N, 2, K+1) view
        torch.bmm(a[i], units, out=scratch)
        torch.addcmul(scratch, k_units[i], v1[i], out=units)


class FusedAdamStep:
    """``optimizer.step()`` of a fused Adam, as the two kernel calls it comes down to.

    At one stream per tick ``torch.optim.Adam.step`` spent about as long in its Python bookkeeping
    (grouping the tensors again, hooks, checks) as the fused kernel spent updating every parameter.
    This keeps each group's tensor lists and calls the same kernels with the group's current
    hyperparameters (an ``lr`` set on ``param_groups`` applies); ``tests/learner/test_fast_paths.py``
    checks that it is bit-identical to ``optimizer.step()``. Only for the configuration it replicates:
    ``for_optimizer`` returns None for any other, and the learner keeps calling ``step()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.groups = []
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]  # step() skips the others too
            if not params:
                continue
            state = [optimizer.state[p] for p in params]
            tensors = [
                params,
                [s["exp_avg"] for s in state],
                [s["exp_avg_sq"] for s in state],
                [s["step"] for s in state],
            ]
            self.groups.append((group, tensors))

    @classmethod
    def for_optimizer(cls, optimizer: torch.optim.Optimizer) -> FusedAdamStep | None:
        """The direct step, after ``optimizer`` has taken its first step; None where it does not apply."""
        if type(optimizer) is not torch.optim.Adam or not hasattr(torch, "_fused_adam_"):
            return None
        for group in optimizer.param_groups:
            flags = (group["amsgrad"], group["maximize"], group["capturable"], group["differentiable"])
            decoupled = group.get("decoupled_weight_decay", False)
            if not group["fused"] or any(flags) or decoupled or torch.is_tensor(group["lr"]):
                return None
            live = [p for p in group["params"] if p.grad is not None]  # a frozen E has no .grad
            for p in live:
                state = optimizer.state[p]
                if "step" not in state or p.device.type != "cpu" or p.dtype != live[0].dtype:
                    return None
        return cls(optimizer)

    def __call__(self) -> None:
        for group, (params, exp_avgs, exp_avg_sqs, steps) in self.groups:
            grads = [p.grad for p in params]  # read each time: a .grad may have been replaced
            beta1, beta2 = group["betas"]
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                amsgrad=False,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )
