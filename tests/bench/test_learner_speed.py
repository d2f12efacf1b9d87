"""The learner benchmark (issue 2): ``python -m bench.learner_speed`` run briefly on a small model.

Checks that the documented command runs, that every variant is timed in the same run, that the
ratios are taken against ``forward`` as documented (the recompute share included in
``ratio_with_recompute`` for learning variants only), and that memory per stream is flat for RFP and
grows for full-history BPTT.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from bench.learner_speed import VARIANTS, hold_recomputes, main, measure_ticks
from learner import ModelConfig, RFPLearner


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[type-arg]
    out = tmp_path_factory.mktemp("bench") / "learner_speed.json"
    main(["--batch", "1", "3", "--ticks", "4", "--warmup", "2", "--n-units", "16", "--input-size", "32",
          "--threads", "1", "--memory-lengths", "1", "5", "40", "--json", str(out)])  # fmt: skip
    return json.loads(out.read_text())


def test_every_variant_is_timed_against_forward_in_one_run(report: dict) -> None:  # type: ignore[type-arg]
    per_tick_ms = report["whitening_recompute"]["per_tick_ms"]
    assert per_tick_ms > 0
    for batch in ("1", "3"):
        res = report["ticks"][batch]
        assert set(res) == {"forward", "rfp", "rfp-segment", "bptt-k10", "bptt-k100", "bptt-full"}
        fwd = res["forward"]
        assert fwd["ratio_to_forward"] == 1.0 and fwd["ratio_with_recompute"] == 1.0
        for name, r in res.items():
            assert r["ticks"] == 4 and r["mean_ms"] > 0
            assert math.isclose(r["fixations_per_s"], int(batch) / (r["mean_ms"] / 1e3), rel_tol=1e-9)
            assert math.isclose(r["ratio_to_forward"], r["mean_ms"] / fwd["mean_ms"], rel_tol=1e-9)
            if name != "forward":
                expected = (r["mean_ms"] + per_tick_ms) / fwd["mean_ms"]
                assert math.isclose(r["ratio_with_recompute"], expected, rel_tol=1e-9)


class PausedRFP(RFPLearner):
    """RFP with a known pause inside every tick: what a timer that times the tick must see."""

    PAUSE_S = 0.05

    def tick(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(self.PAUSE_S)
        return super().tick(*args, **kwargs)


def test_the_times_are_measured_around_each_variants_own_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test above only recomputes ratios from the report's own numbers, which a timer that timed
    nothing would pass. Here a variant pauses 50 ms inside each tick: every one of its timed ticks must
    take at least that (sleep guarantees a lower bound, so no load makes this fail), and each timed
    tick must be a real one of that variant's learner."""
    made: list[PausedRFP] = []

    def paused(cfg: ModelConfig, device: str) -> PausedRFP:
        made.append(PausedRFP(cfg, device=device))
        return made[-1]

    monkeypatch.setitem(VARIANTS, "paused", paused)
    cfg = ModelConfig(n_units=16, input_size=32, segment_len=0)
    res = measure_ticks(cfg, 2, ["forward", "paused"], ticks=3, warmup=1, device="cpu")
    pause_ms = PausedRFP.PAUSE_S * 1e3
    assert res["paused"]["ticks"] == 3 and made[0].ticks == 1 + 3
    assert res["paused"]["p50_ms"] >= pause_ms and res["paused"]["mean_ms"] >= pause_ms
    assert res["paused"]["fixations_per_s"] <= 2 / PausedRFP.PAUSE_S
    assert math.isclose(
        res["paused"]["ratio_to_forward"], res["paused"]["mean_ms"] / res["forward"]["mean_ms"]
    )


def test_memory_per_stream_is_flat_for_rfp_and_grows_for_bptt(report: dict) -> None:  # type: ignore[type-arg]
    rows = report["memory"]["rows"]
    assert [r["T"] for r in rows] == [1, 5, 40]
    assert len({r["rfp_bytes"] for r in rows}) == 1
    assert rows[0]["bptt_bytes"] < rows[1]["bptt_bytes"] < rows[2]["bptt_bytes"]


def test_held_recomputes_are_released() -> None:
    cfg = ModelConfig(trunk="none", in_features=6, n_units=5, embed_dim=3, pred_hidden=4)
    learner = RFPLearner(cfg)
    norm = learner.model.context_norm
    assert norm is not None
    feats = torch.randn(8, 1, 6, generator=torch.Generator().manual_seed(0))
    release = hold_recomputes(learner)
    for x in feats[:4]:  # recomputes after 1, 2 and 4 observations would fall due here
        learner.tick_features(["a"], x)
    assert torch.equal(norm.whiten, torch.eye(5))  # nothing recomputed
    release()
    for x in feats[4:7]:
        learner.tick_features(["a"], x)
    assert torch.equal(norm.whiten, torch.eye(5))  # none due after 5, 6, 7
    learner.tick_features(["a"], feats[7])  # the 8th: due
    assert not torch.equal(norm.whiten, torch.eye(5))
