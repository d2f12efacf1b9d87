"""Back-propagation through time on the same R-JEPA model: the reference and the baseline for RFP.

Three variants, all behind the same ``tick`` interface as ``RFPLearner``:

* ``update_mode='segment'``: store the segment's inputs, and at the segment end unroll the whole
  segment with autograd from its start state and step once (full-segment BPTT; RFP's segment mode
  gives the same gradient).
* ``update_mode='every_fixation'``, ``window=K``: truncated BPTT(K): at every fixation, re-run the
  last K steps from the state at the window start with autograd and back-propagate this fixation's
  loss through them. Memory O(K N + K M) and compute O(K) steps per fixation.
* ``window=None`` with ``every_fixation``: full-history BPTT: the window is everything since the
  stream's last reset, so memory and compute grow with the length of the sequence.

Inputs are the trunk features u (the trunk is frozen), so re-running a window never touches the trunk.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from learner.errors import ConfigError
from learner.model import Scores
from learner.streaming import StreamLearner


class BPTTLearner(StreamLearner):
    """R-JEPA trained by full-segment, truncated (window K) or full-history BPTT.

    Examples
    --------
    >>> from learner.config import ModelConfig
    >>> cfg = ModelConfig(trunk="none", in_features=8, n_units=6, embed_dim=4, pred_hidden=5, loss="cosine")
    >>> learner = BPTTLearner(cfg, window=3)
    >>> for _ in range(5):
    ...     out = learner.tick_features(["a"], torch.randn(1, 8))
    >>> out.step.item(), learner.updates_applied  # tick 1 predicts nothing; tick 2 scores a 0 prediction
    (5, 3)
    """

    can_spill = False  # the windows below are keyed by slot, and spilling moves streams between slots

    def __init__(self, *args, window: int | None = None, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        if self.cfg.preview_features:  # its unrolls and segments would have to keep the previews too
            raise ConfigError("BPTTLearner does not read a preview (preview_features); use RFPLearner")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.window = window
        self._inputs: dict[int, list[torch.Tensor]] = defaultdict(list)  # slot -> [(M,)] since window start
        # slot -> (h, c) at the window start and the input u before it (what its first loss reads)
        self._start: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._weights: dict[int, list[float]] = defaultdict(list)  # segment mode: each scored step's weight

    def _on_reset(self, slots: torch.Tensor) -> None:
        for s in slots.tolist():
            self._inputs.pop(s, None)
            self._start.pop(s, None)
            self._weights.pop(s, None)

    def _start_state(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        zero = self.model.zero_state(1)[0]
        return self._start.get(slot, (zero, zero, zero.new_zeros(self.model.context_features)))

    def _learn(
        self, slots: torch.Tensor, u: torch.Tensor, scored: torch.Tensor, v: torch.Tensor | None = None
    ) -> tuple[Scores, torch.Tensor]:
        model, st = self.model, self.states
        out = self.scored_rows(len(slots), u)
        segment = self.cfg.update_mode == "segment"
        h_prev, c_prev = st.h[slots], st.c[slots]  # (B, N): the stored states (segment mode: exact)
        u_prev = st.u[slots]  # (B, M) the inputs the previous fixations were embedded with
        idx = scored.nonzero().squeeze(1)
        if idx.numel() and not segment:
            h_prev, c_prev = h_prev.clone(), c_prev.clone()
            groups: dict[int, list[int]] = defaultdict(list)  # history length -> rows of this tick
            for i in idx.tolist():
                groups[len(self._inputs[int(slots[i])])].append(i)
            unrolled = []
            for rows in groups.values():
                hp, cp = self._unroll([int(slots[i]) for i in rows])  # (Bg, N) with graph
                with torch.no_grad():
                    h_t, _, _ = model.rgc.step(u[rows], hp.detach(), cp.detach())
                got = model.scores(u_prev[rows], hp.detach(), u[rows], h_t)
                out.put(rows, got)
                unrolled.append((rows, hp, h_t))
                h_prev[rows], c_prev[rows] = hp.detach(), cp.detach()
            n_ok = max(int(out.ok.sum()), 1)
            for rows, hp, h_t in unrolled:  # the mean over the well-conditioned rows of the tick
                per_stream = model.loss(u_prev[rows], hp, u[rows], h_t)  # (Bg,)
                (per_stream * out.ok[rows]).sum().div(n_ok).backward()
        with torch.no_grad():
            h, c, cache = model.rgc.step(u, h_prev, c_prev)
            if segment and idx.numel():
                out.put(idx, model.scores(u_prev[idx], h_prev[idx], u[idx], h[idx]))
        n_ok = max(int(out.ok.sum()), 1)
        for i, s in enumerate(slots.tolist()):
            self._inputs[s].append(u[i].detach())
            if segment and bool(scored[i]):
                self._weights[s].append(float(out.ok[i]) / n_ok)
            if self.window is not None and not segment and len(self._inputs[s]) > self.window:
                self._advance_start(s)
        st.h[slots], st.c[slots] = h, c
        return out, model.rgc.jacobian(cache).a

    def _unroll(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-run each stream's window from its start state with autograd: (Bg, N), (Bg, N)."""
        starts = [self._start_state(s) for s in slots]
        h = torch.stack([hc[0] for hc in starts])
        c = torch.stack([hc[1] for hc in starts])
        inputs = torch.stack([torch.stack(self._inputs[s]) for s in slots], 1)  # (L, Bg, M)
        for u_t in inputs:
            h, c, _ = self.model.rgc.step(u_t, h, c)
        return h, c

    @torch.no_grad()
    def _advance_start(self, slot: int) -> None:
        """Slide the window: fold its oldest input into the start state."""
        h, c, _ = self._start_state(slot)
        u0 = self._inputs[slot].pop(0)
        h, c, _ = self.model.rgc.step(u0[None], h[None], c[None])
        self._start[slot] = (h[0], c[0], u0[: self.model.context_features])

    def end_segment(self) -> bool:
        """Segment mode: full BPTT over every stream's stored segment, then one step."""
        if self.cfg.update_mode == "segment" and self._scored_ticks:
            model = self.model
            for s, inputs in self._inputs.items():
                weights = self._weights.get(s, [])
                if not weights:
                    continue
                h0, c0, u0 = self._start_state(s)
                h, c = h0[None], c0[None]
                hs = [h]
                for u_t in inputs:
                    h, c, _ = model.rgc.step(u_t[None], h, c)
                    hs.append(h)
                traj = torch.cat(hs)  # (T+1, N): the start state, then h_1..h_T of this window
                us = torch.cat([u0[None], torch.stack(inputs)[:, : model.context_features]])  # (T+1, M)
                # the scored steps are the last len(weights) (after a reset the first is not scored)
                per_step = model.loss(us[:-1], traj[:-1], us[1:], traj[1:])[-len(weights) :]  # (Ts,)
                w = torch.tensor(weights, dtype=per_step.dtype, device=per_step.device)
                (per_step * w).sum().backward()
            stepped = self._apply_step()
            for s in list(self._inputs):  # the next segment starts from the current states
                st = self.states
                self._start[s] = (st.h[s].clone(), st.c[s].clone(), st.u[s].clone())
                self._inputs[s].clear()
                self._weights.pop(s, None)
            return stepped
        return super().end_segment()

    # --- persistence: the windows are part of each stream's state ------------------------------
    def state_dict(self, *, streams: bool = True) -> dict[str, Any]:
        sd = super().state_dict(streams=streams)
        windows = {}
        for sid in self.stream_ids():
            s = self.states.slot_of(sid)
            entry: dict[str, Any] = {
                "inputs": [t.cpu() for t in self._inputs.get(s, [])],
                "weights": list(self._weights.get(s, [])),
            }
            if s in self._start:
                entry["start"] = [t.cpu() for t in self._start[s]]  # h, c, u before the window
            windows[sid] = entry
        sd["windows"] = windows
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self._inputs.clear()
        self._start.clear()
        self._weights.clear()
        for sid, entry in sd["windows"].items():
            s = self.states.slot_of(sid)
            self._inputs[s] = [t.to(self.device, self.dtype) for t in entry["inputs"]]
            if entry["weights"]:
                self._weights[s] = list(entry["weights"])
            if "start" in entry:
                h, c, u = (t.to(self.device, self.dtype) for t in entry["start"])
                self._start[s] = (h, c, u)
