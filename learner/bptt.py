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

from learner.streaming import StreamLearner


class BPTTLearner(StreamLearner):
    """R-JEPA trained by full-segment, truncated (window K) or full-history BPTT.

    Examples
    --------
    >>> from learner.config import ModelConfig
    >>> cfg = ModelConfig(trunk="none", in_features=8, n_units=6, embed_dim=4, pred_hidden=5)
    >>> learner = BPTTLearner(cfg, window=3)
    >>> for _ in range(5):
    ...     out = learner.tick_features(["a"], torch.randn(1, 8))
    >>> out.step.item(), learner.updates_applied
    (5, 4)
    """

    def __init__(self, *args, window: int | None = None, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.window = window
        self._inputs: dict[int, list[torch.Tensor]] = defaultdict(list)  # slot -> [(M,)] since window start
        self._start: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (h, c) at window start
        self._weights: dict[int, list[float]] = defaultdict(list)  # segment mode: 1/Bs of each scored step

    def _on_reset(self, slots: torch.Tensor) -> None:
        for s in slots.tolist():
            self._inputs.pop(s, None)
            self._start.pop(s, None)
            self._weights.pop(s, None)

    def _start_state(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        zero = self.model.zero_state(1)[0]
        return self._start.get(slot, (zero, zero))

    def _learn(self, slots: torch.Tensor, u: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        model, st = self.model, self.states
        error = self.nan_errors(len(slots), u)
        n_scored = int(scored.sum())
        segment = self.cfg.update_mode == "segment"
        h_prev, c_prev = st.h[slots], st.c[slots]  # (B, N): the stored states (segment mode: exact)
        if n_scored and not segment:
            h_prev, c_prev = h_prev.clone(), c_prev.clone()
            groups: dict[int, list[int]] = defaultdict(list)  # history length -> rows of this tick
            for i in scored.nonzero().squeeze(1).tolist():
                groups[len(self._inputs[int(slots[i])])].append(i)
            for rows in groups.values():
                hp, cp = self._unroll([int(slots[i]) for i in rows])  # (Bg, N) with graph
                with torch.no_grad():
                    h_t, _, _ = model.rgc.step(u[rows], hp.detach(), cp.detach())
                per_stream = model.loss(hp, h_t)  # (Bg,)
                (per_stream.sum() / n_scored).backward()
                error[rows] = per_stream.detach()
                h_prev[rows], c_prev[rows] = hp.detach(), cp.detach()
        with torch.no_grad():
            h, c, _ = model.rgc.step(u, h_prev, c_prev)
            if segment and n_scored:
                idx = scored.nonzero().squeeze(1)
                error[idx] = model.loss(h_prev[idx], h[idx])
        for i, s in enumerate(slots.tolist()):
            self._inputs[s].append(u[i].detach())
            if segment and bool(scored[i]):
                self._weights[s].append(1.0 / n_scored)
            if self.window is not None and not segment and len(self._inputs[s]) > self.window:
                self._advance_start(s)
        st.h[slots], st.c[slots] = h, c
        return error

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
        h, c = self._start_state(slot)
        u0 = self._inputs[slot].pop(0)
        h, c, _ = self.model.rgc.step(u0[None], h[None], c[None])
        self._start[slot] = (h[0], c[0])

    def end_segment(self) -> bool:
        """Segment mode: full BPTT over every stream's stored segment, then one step."""
        if self.cfg.update_mode == "segment" and self._scored_ticks:
            for s, inputs in self._inputs.items():
                weights = self._weights.get(s, [])
                if not weights:
                    continue
                h, c = (t[None] for t in self._start_state(s))
                hs = [h]
                for u_t in inputs:
                    h, c, _ = self.model.rgc.step(u_t[None], h, c)
                    hs.append(h)
                traj = torch.cat(hs)  # (T+1, N): the start state, then h_1..h_T of this window
                # the scored steps are the last len(weights) (after a reset the first is not scored)
                per_step = self.model.loss(traj[:-1], traj[1:])[-len(weights) :]  # (Ts,)
                w = torch.tensor(weights, dtype=per_step.dtype, device=per_step.device)
                (per_step * w).sum().backward()
            stepped = self._apply_step()
            for s in list(self._inputs):  # the next segment starts from the current states
                slot = torch.tensor([s])
                self._start[s] = (self.states.h[slot][0].clone(), self.states.c[slot][0].clone())
                self._inputs[s].clear()
                self._weights.pop(s, None)
            return stepped
        return super().end_segment()

    # --- persistence: the windows are part of each stream's state ------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        windows = {}
        for sid in self.stream_ids():
            s = self.states.slot_of(sid)
            entry: dict[str, Any] = {
                "inputs": [t.cpu() for t in self._inputs.get(s, [])],
                "weights": list(self._weights.get(s, [])),
            }
            if s in self._start:
                entry["start"] = [t.cpu() for t in self._start[s]]
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
                h, c = (t.to(self.device, self.dtype) for t in entry["start"])
                self._start[s] = (h, c)
