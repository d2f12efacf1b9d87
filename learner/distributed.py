"""Data-parallel learning on torch.distributed: each rank ticks its own streams, all share one model.

The streams are partitioned across the ranks of a process group (gloo on CPUs, NCCL on GPUs); a
stream's state and traces live on one rank only. What every rank must hold identically is the
*shared* state: the weights, the optimizer's moments, and the running statistics that update from
data (``RunningWhitening`` of the trunk features, of the context state and, with ``whitened_mse``,
of the embedding's changes, plus ``RJEPA.change_sq``). One learning tick of R ranks then gives the
same update as one learner ticking all of the ranks' streams together (rank 0's rows, then rank
1's, ...)::

    one learner:  grad = (1/n) sum_{b ok} g_b                  n = ok rows of the tick
    R ranks:      grad = (1/sum_r n_r) sum_r (n_r * mean_r)    mean_r = rank r's ``.grad`` after _learn

Three collectives a learning tick, in the same order on every rank (``TickSync``):

1. ``all_gather`` of (rows, learning tick number): the lockstep check, and where each rank's rows go;
2. the trunk features of every rank's rows (the input whitening observes the whole tick before any
   rank whitens its own rows), when the model whitens its inputs;
3. one ``all_reduce`` (sum) of one flat buffer: every gradient times the rank's count of ok rows, the
   count, and every rank's new states and scored changes (each rank writes its rows at its offset,
   zeros elsewhere, so the sum is an exact gather) for the context and change statistics.

**Tick boundaries** are a lockstep counter: the k-th learning tick of every rank is global tick k.
So every rank calls ``tick_features`` with ``learn=True`` exactly once per tick, and a rank with no
fixation in it calls ``idle_tick`` (zero rows: it contributes zero gradient and a zero count, and
still observes the other ranks' rows); a caller such as a worker loop must take exactly one of them
per iteration. The counter travels in the first collective and differing counters raise
``DistributedError``; since the collectives pair up in order, that catches a rank whose collectives
went out of step (one that joined another group's ticks, say), not a rank that skips a tick: that
one's next tick is simply paired with the others' current one. Forward-only ticks
(``learn=False``) touch no shared state and are not collective. Only
``update_mode='every_fixation'`` is supported: segment mode would need the ranks' segments in
lockstep too.

**A rank that stops or stalls**: gloo collectives fail when a peer's connection closes, and time out
after the ``timeout`` given to ``init_process_group``; both reach the other ranks as ``RankLost``
naming the rank, the tick and the step, never a hang. (NCCL reports a timed-out collective through
its watchdog, which ends the process; torchrun then stops the others.)

The gradients agree with one learner up to rounding (n_r * mean_r is not bit for bit the sum the
single learner forms); the whitening statistics observe the same rows in the same order (the input
whitening stays bit-identical to the single learner's; the others observe states, which follow the
weights' rounding). In float64, 60 ticks of 2 ranks: 3e-13 relative at most
(tests/learner/test_distributed.py). Every rank applies bit-identical updates (one all-reduced buffer).

Examples
--------
One process is a group of one (gloo, a local file store)::

    >>> import tempfile, torch, torch.distributed as dist
    >>> from learner.config import ModelConfig
    >>> from learner.rfp import RFPLearner
    >>> store = dist.FileStore(tempfile.mktemp(), 1)
    >>> dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    >>> learner = RFPLearner(ModelConfig(trunk="none", in_features=8, n_units=6, embed_dim=4, pred_hidden=5))
    >>> sync = join(learner)
    >>> out = learner.tick_features(["a"], torch.randn(1, 8))
    >>> out = idle_tick(learner)
    >>> sync.ticks
    2
    >>> dist.destroy_process_group()
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from learner.errors import ConfigError, DistributedError, RankLost
from learner.model import RJEPA, Scores
from learner.streaming import StreamLearner, TickOutput, grad_of


class TickSync:
    """The collectives of one learning tick, so that ranks holding different streams keep one model.

    Made by ``join``; ``StreamLearner.tick_features`` calls ``observe_inputs`` before the forward
    pass and ``reduce`` before the optimizer step.
    """

    def __init__(self, learner: StreamLearner, group: dist.ProcessGroup | None = None) -> None:
        self.learner, self.group = learner, group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.ticks = 0  # learning ticks taken in lockstep since join
        self.timeout = _timeout_s(group, learner.device)
        # wall time in collectives, waiting for slower ranks included (CPU: gloo blocks; with NCCL only
        # the launches, which return at once)
        self.collective_s = 0.0
        self._counts: list[int] = []  # rows of each rank in this tick
        self._offset = 0  # where this rank's rows start among every rank's

    # --- collectives, with the error a lost peer gives ------------------------------------------
    def _collective(self, what: str, call: Callable[[], Any]) -> None:
        start = time.perf_counter()
        try:
            call()
        except RuntimeError as e:  # torch's DistBackendError and gloo's errors are RuntimeErrors
            raise RankLost(
                f"rank {self.rank} of {self.world}, learning tick {self.ticks}: {what} failed: another rank "
                f"exited, or stalled past the {self.timeout} timeout ({str(e).strip()[:300]})"
            ) from e
        finally:
            self.collective_s += time.perf_counter() - start

    def _gather_rows(self, what: str, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's rows (Bt, F) in rank order, from this rank's (B, F): an all-reduce of zeros
        with each rank's rows at its offset (exact: x + 0 = x)."""
        out = rows.new_zeros(sum(self._counts), rows.shape[1])  # (Bt, F)
        out[self._offset : self._offset + rows.shape[0]] = rows
        self._collective(what, lambda: dist.all_reduce(out, group=self.group))
        return out

    # --- the tick ----------------------------------------------------------------------------------
    def observe_inputs(self, model: RJEPA, u: torch.Tensor) -> None:
        """Collectives 1 and 2: agree on the tick and its rows; the input whitening observes them all."""
        self.ticks += 1
        header = torch.tensor([u.shape[0], self.ticks], dtype=torch.long, device=u.device)
        headers = [torch.empty_like(header) for _ in range(self.world)]
        self._collective("the lockstep check", lambda: dist.all_gather(headers, header, group=self.group))
        counts, ticks = zip(*(h.tolist() for h in headers), strict=True)
        if len(set(ticks)) > 1:
            raise DistributedError(
                f"ranks out of lockstep: their learning ticks are {list(ticks)} (rank order); every "
                "rank must call tick_features(learn=True) or idle_tick once per tick"
            )
        self._counts = list(counts)
        self._offset = sum(counts[: self.rank])
        norm = model.input_norm
        if norm is not None and sum(counts):
            norm.observe(self._gather_rows("the input rows' all-reduce", u))

    def reduce(
        self, learner: StreamLearner, scores: Scores, h: torch.Tensor
    ) -> tuple[bool, torch.Tensor, Scores]:
        """Collective 3: sum the ranks' gradients and ok counts into the mean over every rank's ok
        rows (in ``.grad``), and gather every rank's new states h (B, N) and scored changes.

        Returns whether any rank scored a row, every rank's states (Bt, N), and scores whose
        ``change`` and NaN ``error`` rows say which changes the change statistics observe.
        """
        grads = [grad_of(p) for p in learner._params]
        total, b = sum(self._counts), h.shape[0]
        model = learner.model
        n_grad = sum(g.numel() for g in grads)
        n_h = total * h.shape[1] if model.context_norm is not None else 0
        dim = scores.change.shape[1]
        n_change = total * (dim + 1) if model.change_norm is not None else 0
        buf = h.new_zeros(n_grad + 1 + n_h + n_change)  # [grad sums | ok count | h rows | changes, valid]
        count = int(scores.ok.sum())
        torch.cat([g.reshape(-1) for g in grads], out=buf[:n_grad]).mul_(count)
        buf[n_grad] = count
        at, rows = n_grad + 1, slice(self._offset, self._offset + b)
        if n_h:
            buf[at : at + n_h].view(total, -1)[rows] = h
            at += n_h
        if n_change:
            block = buf[at : at + n_change].view(total, dim + 1)  # (Bt, D + 1): change, then valid
            block[rows, :dim] = scores.change
            block[rows, dim] = (~scores.error.isnan()).to(buf.dtype)
        self._collective("the gradient all-reduce", lambda: dist.all_reduce(buf, group=self.group))
        n = float(buf[n_grad])
        flat = buf[:n_grad]
        if n:
            flat.div_(n)
        else:
            flat.zero_()
        parts = flat.split([g.numel() for g in grads])
        torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(parts, grads, strict=True)])
        h_all = buf[n_grad + 1 : n_grad + 1 + n_h].view(total, -1) if n_h else h
        seen = scores
        if n_change:
            block = buf[n_grad + 1 + n_h :].view(total, dim + 1)
            error = torch.where(block[:, dim] > 0, 0.0, float("nan")).to(buf.dtype)  # (Bt,)
            seen = Scores(error, error, block[:, dim] > 0, block[:, :dim])
        return n > 0, h_all, seen

    # --- agreement ---------------------------------------------------------------------------------
    def check_identical(self) -> None:
        """Raise ``DistributedError`` unless every rank's shared state (``fingerprint``) is rank 0's:
        a collective of 32 bytes, for start-up (different checkpoints or configs) and spot checks."""
        mine = torch.tensor(list(fingerprint(self.learner)), dtype=torch.uint8, device=self.learner.device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        self._collective("the shared-state check", lambda: dist.all_gather(every, mine, group=self.group))
        differ = [r for r, d in enumerate(every) if not torch.equal(d, every[0])]
        if differ:
            raise DistributedError(
                f"ranks {differ} hold another model than rank 0 (weights, optimizer or running "
                "statistics differ): start every rank from the same checkpoint and ModelConfig"
            )


def join(learner: StreamLearner, group: dist.ProcessGroup | None = None) -> TickSync:
    """Make ``learner`` one rank of a data-parallel group (``dist.init_process_group`` first).

    Collective: every rank of the group calls it, with a learner in the same state (the same
    ``ModelConfig`` and checkpoint); it checks that, and from then on every learning tick is
    collective (see the module docstring).
    """
    if not dist.is_initialized():
        raise ConfigError("torch.distributed is not initialised: call dist.init_process_group first")
    if learner.cfg.update_mode != "every_fixation":
        raise ConfigError(
            f"distributed learning needs update_mode='every_fixation', not {learner.cfg.update_mode!r}"
        )
    sync = TickSync(learner, group)
    sync.check_identical()
    learner.sync = sync
    return sync


def idle_tick(learner: StreamLearner) -> TickOutput:
    """This rank's part of a learning tick in which it has no fixation: zero rows, zero gradient."""
    if learner.sync is None:
        raise ConfigError("idle_tick is a rank's part of a collective tick: join(learner) first")
    return learner.tick_features([], learner.model.rgc.W.new_zeros(0, learner.cfg.M))


def shared_state(learner: StreamLearner) -> dict[str, Any]:
    """What every rank must hold identically: weights and running statistics (trunk excluded: it is
    frozen), the optimizer's state, the pending gradient and the update count."""
    weights = {k: v for k, v in learner.model.state_dict().items() if not k.startswith("trunk.")}
    grads = {n: p.grad for n, p in learner.model.named_parameters() if p.grad is not None}
    optim = learner.optimizer.state_dict()["state"]
    return {"weights": weights, "optimizer": optim, "grads": grads, "updates": learner.updates_applied}


def fingerprint(learner: StreamLearner) -> bytes:
    """SHA-256 of ``shared_state``, bit for bit (equal digests: identical models)."""
    digest = hashlib.sha256()
    _feed(digest, shared_state(learner))
    return digest.digest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _feed(digest, value[key])
    elif torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        digest.update(repr(value).encode())


def _timeout_s(group: dist.ProcessGroup | None, device: torch.device) -> str:
    """The group's collective timeout, for error messages (torch keeps it in private attributes)."""
    try:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        value = pg._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):
        value = None
    return f"{value.total_seconds():g} s" if isinstance(value, timedelta) else "process group's"
