"""What every foveate learner shares: streams, ticks, resets, segments, the optimizer, persistence.

A **tick** takes one fixation from each of B distinct streams, advances each stream's state by one
step, scores the prediction each stream made at its previous fixation, and (in ``every_fixation``
mode) applies **one optimizer step on the mean of the per-stream gradients** of the streams that
were scored in this tick; streams whose fixation is the first after a reset are advanced but not
scored. In ``segment`` mode gradients are summed over ticks and, at the segment end, divided by the
number of scored ticks before one step: the mean over time of the per-tick means, which equals the
BPTT gradient of the same objective exactly.

Subclasses (``rfp.RFPLearner``, ``bptt.BPTTLearner``) implement ``_learn``: advance the given slots
by one step and leave the gradients of this tick's mean loss in ``param.grad``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from learner.config import ModelConfig
from learner.diagnostics import Diagnostics
from learner.errors import ConfigError, InputError
from learner.kernels import FusedAdamStep
from learner.model import RJEPA, Scores
from learner.patches import preprocess
from learner.rgc import spectral_radius
from learner.state import StreamStates


@dataclass
class TickOutput:
    """Result of one tick, one row per stream, in the order given."""

    stream_ids: list[str]
    step: torch.Tensor  # (B,) long: fixations since the stream's last reset, this one included
    error: torch.Tensor  # (B,) this fixation's prediction error; NaN where nothing was predicted
    prediction: torch.Tensor  # (B, D) predicted embedding of each stream's next fixation
    updated: bool  # an optimizer step was applied in this tick
    repeat_error: torch.Tensor  # (B,) error of "repeat the current embedding" on it; NaN likewise
    skipped: torch.Tensor  # (B,) bool: scored, but too ill-conditioned to learn from (model.well_conditioned)
    trace_radius: float  # largest spectral radius of a unit's 2x2 Jacobian block in this tick (>1: growth)


def _fused_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's fused Adam/SGD kernels serve this device and dtype."""
    return device.type in ("cpu", "cuda") and dtype in (torch.float32, torch.float64)


def grad_of(p: torch.Tensor) -> torch.Tensor:
    """``p.grad``: StreamLearner gives every trainable parameter a zeroed gradient at the start."""
    g = p.grad
    assert g is not None
    return g


def _cloned(state: dict[str, Any]) -> dict[str, Any]:
    """One parameter's optimizer state with its tensors copied."""
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when there is one."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class StreamLearner:
    """Base class of the learners: holds the model, the optimizer and every stream's state."""

    def __init__(
        self, cfg: ModelConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(device)
        self.dtype = dtype
        self.model = RJEPA(cfg).to_device(self.device, dtype)
        # embed_lr_scale 0 keeps E at its initialisation: no gradient is computed for it (a D x (M + N)
        # outer product a tick) and the optimizer skips it (torch's Adam passes over a None .grad)
        self.model.E.weight.requires_grad_(cfg.embed_lr_scale > 0)
        params = self.model.rfp_parameters() + self.model.head_parameters()
        for p in params:
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        self._params = [p for p in params if p.requires_grad]  # for the per-tick foreach calls
        gains = self.model.gain_parameters()
        embedding = [self.model.E.weight]
        # the preview's Q has a group of its own (``preview_lr_scale``), only in a model with one, so
        # that every other model's optimizer, and its checkpoints, keep their three groups
        preview = list(self.model.Q.parameters()) if self.model.Q is not None else []
        special = {id(p) for p in gains + embedding + preview}
        members = ([p for p in params if id(p) not in special], gains, embedding) + (
            (preview,) if preview else ()
        )
        groups: list[dict[str, Any]] = [
            {"params": ps, "lr": lr} for ps, lr in zip(members, self.group_lrs(), strict=True)
        ]
        # The fused implementation updates every parameter of a group in one kernel: at B = 1 the
        # multi-kernel Adam step was the largest fixed cost of a tick (about 3x slower, cache-cold).
        self._fused = True if _fused_ok(self.device, dtype) else None  # None: torch's own default
        if cfg.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=self._fused
            )
        else:
            self.optimizer = torch.optim.SGD(
                groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=self._fused
            )
        self.states = StreamStates(
            cfg.n_units,
            cfg.embed_dim,
            self._trace_shapes(),
            inputs=self.model.context_features,
            device=self.device,
            dtype=dtype,
        )
        self._direct_step: FusedAdamStep | None = None  # built after the first step (see _apply_step)
        self._direct_checked = False  # whether the first step has decided on _direct_step
        self.updates_applied = 0
        self.ticks = 0
        self._scored_ticks = 0  # ticks with gradients accumulated since the last step (segment mode)
        self.diagnostics = Diagnostics(cfg.embed_dim)
        # learner.distributed.TickSync when ranks share this model: every learning tick then exchanges
        # the whitening rows and the gradient sums with the other ranks
        self.sync: Any = None

    def group_lrs(self) -> tuple[float, ...]:
        """Learning rates of the optimizer's groups: everything else, the RGC's gains, the embedding E,
        and in a model with a preview its projection Q."""
        cfg = self.cfg
        lrs = (cfg.lr, cfg.lr * cfg.gain_lr_scale, cfg.lr * cfg.embed_lr_scale)
        return lrs + ((cfg.lr * cfg.preview_lr_scale,) if self.model.Q is not None else ())

    # --- subclass interface ---------------------------------------------------------------------
    def _trace_shapes(self) -> dict[str, tuple[int, ...]]:
        return {}

    def _learn(
        self, slots: torch.Tensor, u: torch.Tensor, scored: torch.Tensor, v: torch.Tensor | None = None
    ) -> tuple[Scores, torch.Tensor]:
        """Advance ``slots`` by one step on inputs u (B, M); accumulate the gradients of the mean loss
        over the well-conditioned scored rows; return the tick's scores (``scored_rows``) and each
        unit's 2x2 Jacobian blocks (B, N, 2, 2). ``v`` (B, F): the whitened previews that the
        scored rows' predictions read (``cfg.preview_features``), else None."""
        raise NotImplementedError

    def scored_rows(self, batch: int, like: torch.Tensor) -> Scores:
        """Scores of a tick before any row is scored: NaN errors, nothing well-conditioned."""
        nan = self.nan_errors(batch, like)
        change = like.new_zeros(batch, self.cfg.embed_dim)
        return Scores(nan, nan.clone(), torch.zeros(batch, dtype=torch.bool, device=like.device), change)

    @torch.no_grad()
    def _infer(
        self, slots: torch.Tensor, u: torch.Tensor, scored: torch.Tensor, v: torch.Tensor | None = None
    ) -> tuple[Scores, torch.Tensor]:
        """Forward only: advance h and c, score the predictions; no gradients, traces untouched."""
        st, model = self.states, self.model
        h_prev, c_prev = st.h[slots], st.c[slots]
        h, c, cache = model.rgc.step(u, h_prev, c_prev)
        out = self.scored_rows(len(slots), h)
        idx = scored.nonzero().squeeze(1)
        if idx.numel():
            vs = v[idx] if v is not None else None
            out.put(idx, model.scores(st.u[slots][idx], h_prev[idx], u[idx], h[idx], vs))
        st.h[slots], st.c[slots] = h, c
        return out, model.rgc.jacobian(cache).a

    def _on_reset(self, slots: torch.Tensor) -> None:
        """Hook for learners that keep per-stream state outside ``self.states``."""

    # --- ticks ------------------------------------------------------------------------------------
    def tick(
        self,
        stream_ids: Sequence[str],
        patches: Any,
        reset: Sequence[bool] | None = None,
        *,
        learn: bool = True,
        preview: torch.Tensor | None = None,
    ) -> TickOutput:
        """Learn from one fixation of each stream.

        ``patches``: a uint8 array or tensor (B, P, P, 3) RGB, or a list of uint8 (H, W, 3) arrays of
        any size (resized to ``cfg.input_size``). With ``trunk='none'``: feature vectors (B, M).
        ``learn=False``: forward only (states advance and errors are scored, weights and traces stay;
        a stream that later learns again has stale traces until its next reset).
        ``preview``: trunk-side features (B, F) of each fixation's preview (``tick_features``).
        """
        if self.cfg.trunk == "none":
            x = torch.as_tensor(np.asarray(patches) if not torch.is_tensor(patches) else patches)
            x = x.to(self.device, self.dtype)
        else:
            x = preprocess(patches, self.cfg.input_size, device=self.device, dtype=self.dtype)
        if x.shape[0] != len(stream_ids):
            raise InputError(f"{len(stream_ids)} stream ids but {x.shape[0]} patches")
        return self.tick_features(stream_ids, self.model.encode(x), reset, learn=learn, preview=preview)

    def tick_features(
        self,
        stream_ids: Sequence[str],
        u: torch.Tensor,
        reset: Sequence[bool] | None = None,
        *,
        learn: bool = True,
        preview: torch.Tensor | None = None,
    ) -> TickOutput:
        """Like ``tick`` on trunk features u (B, M).

        ``preview`` (B, F), required exactly when ``cfg.preview_features`` = F > 0: for each
        fixation of this tick, what was known of it before it landed (e.g. the trunk's features of
        its region seen from the previous fixation). The prediction of this fixation's embedding,
        made from the previous tick's state, reads it; a stream's first fixation ignores it. The
        ``prediction`` this tick returns (of the *next* fixation, whose preview is not known yet)
        is made without one (``RJEPA.predictor``).
        """
        cfg = self.cfg
        if u.dim() != 2 or u.shape[1] != cfg.M:
            raise InputError(f"features must have shape (B, {cfg.M}), got {tuple(u.shape)}")
        if not torch.isfinite(u).all():
            raise InputError("features contain NaN or infinite values")
        self._check_preview(preview, u.shape[0])
        slots = self.states.slots(list(stream_ids))
        starts = self.states.step[slots] == 0
        if reset is not None:
            starts |= torch.as_tensor(list(reset), dtype=torch.bool, device=self.device)
        if cfg.segment_len:
            starts |= self.states.step[slots] >= cfg.segment_len
            if learn and cfg.update_mode == "segment":
                self._check_lockstep(slots, starts)
        self._reset_slots(slots[starts])
        scored = ~starts  # (B,) this fixation scores the prediction made at the previous one
        u = u.to(self.dtype)
        if learn and self.sync is not None:
            self.sync.observe_inputs(self.model, u)  # every rank's rows join the input statistics
            u = self.model.normalize(u, update=False)  # (B, M)
        else:
            u = self.model.normalize(u, update=learn)  # (B, M)
        v = self._whiten_preview(preview, scored, learn=learn)  # (B, F) or None
        scores, blocks = self._learn(slots, u, scored, v) if learn else self._infer(slots, u, scored, v)
        st = self.states
        if st.inputs:
            st.u[slots] = u  # what the next fixation's loss reads as u_{t-1}
        st.step[slots] += 1
        st.total[slots] += 1
        self.ticks += 1
        updated = False
        h_seen, seen = None, scores  # the states and scores the running statistics observe
        if learn:
            scored_any = bool(scores.ok.any())
            if self.sync is not None:  # the gradient becomes the mean over every rank's scored rows
                scored_any, h_seen, seen = self.sync.reduce(self, scores, st.h[slots])
            self._scored_ticks += int(scored_any)
            if cfg.update_mode == "every_fixation":
                updated = self._apply_step()
            elif cfg.segment_len and bool((st.step[slots] >= cfg.segment_len).any()):
                updated = self.end_segment()
        step = st.step[slots]  # (B,) a copy
        with torch.no_grad():
            h_now = st.h[slots]  # (B, N)
            h_seen = h_now if h_seen is None else h_seen  # (B, N), or every rank's rows
            if learn and len(h_seen):  # a tick in which no rank had a fixation has nothing to observe
                self.model.observe_context(h_seen)
                self.model.observe_change(seen)
            z = self.model.embed(u, h_now)  # (B, D)
            pred = self.model.G(z)  # (B, D) with the weights after this tick's step
            st.pred[slots] = pred
            radius = float(spectral_radius(blocks).max()) if blocks.numel() else 0.0
            self.diagnostics.observe(step, scores.error, z, h_now, radius, scores.repeat)
        skipped = scored & ~scores.ok
        return TickOutput(list(stream_ids), step, scores.error, pred, updated, scores.repeat, skipped, radius)

    def _check_preview(self, preview: torch.Tensor | None, batch: int) -> None:
        """A preview of (B, F) exactly when the model reads one; a clear error otherwise."""
        f = self.cfg.preview_features
        if not f:
            if preview is not None:
                raise InputError("this model reads no preview (ModelConfig.preview_features = 0); drop it")
            return
        if preview is None:
            raise InputError(f"this model reads a preview per fixation: pass preview of shape ({batch}, {f})")
        if preview.dim() != 2 or tuple(preview.shape) != (batch, f):
            raise InputError(f"preview must have shape ({batch}, {f}), got {tuple(preview.shape)}")
        if not torch.isfinite(preview).all():
            raise InputError("preview contains NaN or infinite values")
        if self.sync is not None:
            raise ConfigError("the distributed learner does not share preview statistics yet")

    def _whiten_preview(
        self, preview: torch.Tensor | None, scored: torch.Tensor, *, learn: bool
    ) -> torch.Tensor | None:
        """The scored rows' previews, whitened (their statistics learn from them when ``learn``);
        the other rows 0 (nothing reads them)."""
        if preview is None:
            return None
        v = preview.to(self.device, self.dtype)
        out = torch.zeros_like(v)  # (B, F)
        if bool(scored.any()):
            out[scored] = self.model.normalize_preview(v[scored], update=learn)
        return out

    def _check_lockstep(self, slots: torch.Tensor, starts: torch.Tensor) -> None:
        """Segment mode steps the optimizer when a stream ends its segment; the gradient is exact
        only if no stream is then in the middle of one (its later ticks would carry traces taken
        under the old weights). Refuse such a tick before anything changes (docs/math.md, section 5)."""
        if all(group["lr"] == 0 for group in self.optimizer.param_groups):
            return  # the step leaves the weights as they are: every segment stays exact
        seg = self.cfg.segment_len
        after = torch.where(starts, 0, self.states.step[slots]) + 1  # (B,) each stream's step after it
        if not bool((after >= seg).any()):
            return
        middle = [sid for sid, n in zip(self._ids_of(slots), after.tolist(), strict=True) if n < seg]
        ticking = set(slots.tolist())
        for sid in self.states.stream_ids():
            slot = self.states.slot_of(sid)
            if slot not in ticking and 0 < int(self.states.step.read(slot)) < seg:
                middle.append(sid)
        if middle:
            raise InputError(
                f"segment mode is exact only for streams in lockstep: this tick ends a segment (an "
                f"optimizer step) while {sorted(middle)[:5]} are in the middle of theirs; feed every "
                "stream in every tick, or use update_mode='every_fixation'"
            )

    def _ids_of(self, slots: torch.Tensor) -> list[str]:
        by_slot = {self.states.slot_of(sid): sid for sid in self.states.stream_ids()}
        return [by_slot[s] for s in slots.tolist()]

    def end_segment(self) -> bool:
        """Segment mode: apply the accumulated gradient (mean over scored ticks). True if stepped."""
        return self._apply_step()

    def _apply_step(self) -> bool:
        if not self._scored_ticks:
            return False
        # one foreach kernel over every gradient: Optimizer.zero_grad's per-parameter Python loop cost
        # as much as the zeroing itself at B = 1
        grads = [p.grad for p in self._params if p.grad is not None]
        if self._scored_ticks > 1:
            torch._foreach_div_(grads, float(self._scored_ticks))
        if self._direct_step is not None:
            self._direct_step()
        else:
            self.optimizer.step()  # also creates the optimizer's state at the first step
            if not self._direct_checked:  # decided once: where it does not apply, step() stays
                self._direct_step = FusedAdamStep.for_optimizer(self.optimizer)
                self._direct_checked = True
        torch._foreach_zero_(grads)
        self._scored_ticks = 0
        self.updates_applied += 1
        return True

    # --- streams ----------------------------------------------------------------------------------
    def _reset_slots(self, slots: torch.Tensor) -> None:
        self.states.reset(slots)
        self._on_reset(slots)

    def reset(self, stream_id: str) -> None:
        """Start a new sequence in one stream (new scene): h, c and traces to zero together."""
        self._reset_slots(self.states.slots([stream_id], create=False))

    def drop(self, stream_id: str) -> None:
        slot = self.states.slots([stream_id], create=False)
        self._on_reset(slot)
        self.states.drop(stream_id)

    def stream_ids(self) -> list[str]:
        return self.states.stream_ids()

    def stream_info(self, stream_id: str) -> dict[str, Any]:
        slot = self.states.slot_of(stream_id)
        st = self.states
        return {
            "stream_id": stream_id,
            "step": int(st.step.read(slot)),
            "fixations": int(st.total.read(slot)),
            "h_norm": float(st.h.read(slot).norm()),
        }

    def prediction(self, stream_id: str) -> torch.Tensor | None:
        """The stream's predicted embedding of its next fixation (D,), or None before its first."""
        slot = self.states.slot_of(stream_id)
        return None if int(self.states.step.read(slot)) == 0 else self.states.pred.read(slot).clone()

    def grads(self) -> dict[str, torch.Tensor]:
        """The gradients accumulated since the last optimizer step, by parameter name."""
        return {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}

    # --- persistence ------------------------------------------------------------------------------
    def state_dict(self, *, streams: bool = True) -> dict[str, Any]:
        """Everything needed to continue: weights (trunk excluded), optimizer, counters, streams.

        ``streams=False`` leaves out the per-stream slabs (a checkpoint stores them one file per
        stream); the tensors returned are the live ones, not copies, but for the gradients.
        """
        weights = {k: v for k, v in self.model.state_dict().items() if not k.startswith("trunk.")}
        sd = {
            "weights": weights,
            "optimizer": self.optimizer.state_dict(),
            "counters": {
                "updates_applied": self.updates_applied,
                "ticks": self.ticks,
                "scored_ticks": self._scored_ticks,
            },
            # segment mode: the gradient accumulated so far is part of the state
            "grads": {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None},
        }
        if streams:
            sd["streams"] = self.states.state_dict()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore ``state_dict()``; ``sd["streams"]`` may also be an iterable of rows, one dict per
        stream as ``StreamStates.row`` gives them (``id`` included), read one at a time."""
        missing, unexpected = self.model.load_state_dict(sd["weights"], strict=False)
        missing = [k for k in missing if not k.startswith("trunk.")]
        if missing or unexpected:
            raise ValueError(
                f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        # torch keeps the given tensors when dtype and device already match: copied, so that loading a
        # live learner's state_dict() leaves the two learners' Adam moments apart
        optim = sd["optimizer"]
        optim = {**optim, "state": {k: _cloned(v) for k, v in optim["state"].items()}}
        self.optimizer.load_state_dict(optim)
        self._direct_step, self._direct_checked = None, False  # new state tensors: decided at the next step
        for group in self.optimizer.param_groups:  # the saved groups carry the writer's kernel choice
            group.update(fused=self._fused, foreach=None)
        counters = sd["counters"]
        self.updates_applied = int(counters["updates_applied"])
        self.ticks = int(counters["ticks"])
        self._scored_ticks = int(counters["scored_ticks"])
        streams = sd["streams"]
        if isinstance(streams, dict):
            self.states.load_state_dict(streams)
        else:
            self.states.load_rows(streams)
        params = dict(self.model.named_parameters())
        for name, g in sd["grads"].items():
            grad = params[name].grad
            if grad is not None:  # None: fixed here (E at embed_lr_scale 0), learned by the writer
                grad.copy_(g)

    can_spill = True  # whether every per-stream quantity lives in ``self.states`` (see BPTTLearner)

    def limit_memory(self, max_bytes: int, spill_dir: str | os.PathLike[str] | None = None) -> int:
        """Hold at most ``max_bytes`` of stream state (whole chunks); return the streams that fit.

        With ``spill_dir`` the least recently used streams beyond it wait in files there (see
        learner/state.py); without it a new stream past the cap raises ``StateFull``.
        """
        if spill_dir is not None and not self.can_spill:
            raise ConfigError(f"{type(self).__name__} keeps per-stream state outside its slabs: no spilling")
        st = self.states
        per = self.memory_per_stream()
        streams = max(1, max_bytes // per)
        if not len(st):
            st.chunk = min(st.chunk, streams)
        streams = max(st.chunk, streams // st.chunk * st.chunk)
        st.limit(streams, spill_dir)
        return streams

    def memory_per_stream(self) -> int:
        """Bytes of state each stream holds (independent of the stream's length for RFP)."""
        return self.states.nbytes_per_stream()

    @staticmethod
    def nan_errors(batch: int, like: torch.Tensor) -> torch.Tensor:
        return torch.full((batch,), math.nan, device=like.device, dtype=like.dtype)
