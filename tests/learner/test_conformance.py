"""The conformance suite every learner variant passes (STYLE 7)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from learner import BPTTLearner, ModelConfig, RFPLearner, StreamLearner
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.errors import InputError

M = 10


def cfg(**kw) -> ModelConfig:  # type: ignore[no-untyped-def]
    base = dict(
        trunk="none", in_features=M, n_units=8, embed_dim=5, pred_hidden=7, lr=1e-2, init_scale=0.3, seed=3
    )
    base.update(kw)
    return ModelConfig(**base)


VARIANTS: dict[str, Callable[..., StreamLearner]] = {
    "rfp-online": lambda **kw: RFPLearner(cfg(**kw)),
    "rfp-batched": lambda **kw: RFPLearner(cfg(**kw), batched_traces=True),
    "rfp-segment": lambda **kw: RFPLearner(cfg(update_mode="segment", segment_len=4, **kw)),
    "bptt-k3": lambda **kw: BPTTLearner(cfg(**kw), window=3),
    "bptt-full": lambda **kw: BPTTLearner(cfg(**kw), window=None),
    "bptt-segment": lambda **kw: BPTTLearner(cfg(update_mode="segment", segment_len=4, **kw)),
}


def resets(learner: StreamLearner, now: bool) -> list[bool]:
    """Reset stream x alone when ``now``; in segment mode, all three (it refuses streams out of
    lockstep, test_segment_mode_refuses_streams_out_of_lockstep)."""
    lockstep = learner.cfg.update_mode == "segment"
    return [now, now and lockstep, now and lockstep]


def feats(seed: int, b: int = 3) -> torch.Tensor:
    return torch.randn(b, M, generator=torch.Generator().manual_seed(seed))


def snapshot(learner: StreamLearner, sid: str) -> tuple[torch.Tensor, ...]:
    s = learner.states.slot_of(sid)
    st = learner.states
    return (st.h[s].clone(), st.c[s].clone(), st.step[s].clone(), *(t[s].clone() for t in st.trace.values()))


def same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(params=sorted(VARIANTS))
def make(request: pytest.FixtureRequest) -> Callable[..., StreamLearner]:
    return VARIANTS[request.param]


def test_checkpoint_then_next_step_is_bit_identical(make, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a = make()
    ids = ["x", "y", "z"]
    for t in range(6):
        a.tick_features(ids, feats(t), reset=resets(a, t == 3))
    save_checkpoint(tmp_path / "ck.pt", a, extra={"seq": {"x": 6}})
    b = make()
    assert load_checkpoint(tmp_path / "ck.pt", b) == {"seq": {"x": 6}}
    for t in range(6, 10):
        out_a = a.tick_features(ids, feats(t))
        out_b = b.tick_features(ids, feats(t))
        assert torch.equal(out_a.prediction, out_b.prediction)
        torch.testing.assert_close(out_a.error, out_b.error, rtol=0, atol=0, equal_nan=True)  # bit-identical
    for (na, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na
    assert a.updates_applied == b.updates_applied
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # atomic write left no temporary file


def test_taking_state_dicts_does_not_change_learning(make, request) -> None:  # type: ignore[no-untyped-def]
    # A checkpoint must have no side effect: the running whitenings once folded their pending
    # covariance rows into the covariance in state_dict(), which rounds differently later on.
    # And a learner resumed from one (covariance rows still pending) continues bit for bit.
    a, b, resumed = make(), make(), make()
    ids = ["x", "y", "z"]
    for t in range(60):  # 180 rows: the whitenings' pending buffers (64 rows) fill and recompute
        live = [a, b] if t < 30 else [a, b, resumed]
        for learner in live:
            learner.tick_features(ids, feats(t), reset=resets(learner, t % 25 == 0))
        if t % 7 == 3:
            b.state_dict()
        if t == 29:
            resumed.load_state_dict(b.state_dict())
    # BPTT's segment mode resumed mid-segment differs in the last bits (its stored segment, not the
    # whitenings); the service runs RFP
    resumes = "bptt-segment" not in request.node.callspec.id
    for other in (b, resumed) if resumes else (b,):
        for (name, pa), pb in zip(a.model.named_parameters(), other.model.parameters(), strict=True):
            assert torch.equal(pa, pb), name
        a.state_dict(), other.state_dict()  # the whitenings' sample counters are written into buffers there
        for (name, ba), bb in zip(a.model.named_buffers(), other.model.buffers(), strict=True):
            assert torch.equal(ba, bb), name
        assert same(snapshot(a, "x"), snapshot(other, "x")) and a.updates_applied == other.updates_applied > 0


def test_inputs_are_not_mutated(make) -> None:  # type: ignore[no-untyped-def]
    learner = make()
    u = feats(1)
    keep = u.clone()
    for _ in range(3):
        learner.tick_features(["a", "b", "c"], u)
    assert torch.equal(u, keep)


def test_equal_seeds_give_equal_trajectories(make) -> None:  # type: ignore[no-untyped-def]
    outs = []
    for _ in range(2):
        learner = make()
        outs.append([learner.tick_features(["a", "b", "c"], feats(t)).prediction for t in range(5)])
    assert all(torch.equal(p, q) for p, q in zip(*outs, strict=True))
    other = make(seed=4).tick_features(["a", "b", "c"], feats(0)).prediction
    assert not torch.equal(other, outs[0][0])


def test_streams_are_isolated_with_lr_zero(make) -> None:  # type: ignore[no-untyped-def]
    # the whitening statistics are shared model state, like the weights: frozen here too
    frozen = dict(lr=0.0, input_norm=False, context_norm=False)
    inter = make(**frozen)
    apart_a, apart_b = make(**frozen), make(**frozen)
    for t in range(5):
        inter.tick_features(["A"], feats(t, 1))
        inter.tick_features(["B"], feats(100 + t, 1))
        apart_a.tick_features(["A"], feats(t, 1))
        apart_b.tick_features(["B"], feats(100 + t, 1))
    assert same(snapshot(inter, "A"), snapshot(apart_a, "A"))
    assert same(snapshot(inter, "B"), snapshot(apart_b, "B"))


def test_reset_and_rejected_nan_leave_other_streams_bit_identical(make) -> None:  # type: ignore[no-untyped-def]
    learner = make()
    for t in range(4):
        learner.tick_features(["A", "B"], feats(t, 2))
    before_b = snapshot(learner, "B")
    params = [p.clone() for p in learner.model.parameters()]
    learner.reset("A")
    assert same(snapshot(learner, "B"), before_b)
    assert int(learner.states.step[learner.states.slot_of("A")]) == 0
    assert all(float(t[learner.states.slot_of("A")].abs().sum()) == 0 for t in learner.states.trace.values())
    bad = feats(9, 2)
    bad[0, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        learner.tick_features(["A", "B"], bad)
    assert same(snapshot(learner, "B"), before_b)
    assert all(torch.equal(p, q) for p, q in zip(params, learner.model.parameters(), strict=True))


def test_a_stream_appears_once_per_tick(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="at most once"):
        make().tick_features(["a", "a"], feats(0, 2))


def test_memory_per_stream_does_not_grow_with_length() -> None:
    learner = RFPLearner(cfg())
    learner.tick_features(["a"], feats(0, 1))
    size = learner.memory_per_stream()
    ptrs = [t.data_ptrs() for t in learner.states.trace.values()]
    for t in range(300):
        learner.tick_features(["a"], feats(t, 1))
    assert learner.memory_per_stream() == size
    assert [t.data_ptrs() for t in learner.states.trace.values()] == ptrs  # no reallocation either
    full = BPTTLearner(cfg(segment_len=0), window=None)  # the contrast: full-history BPTT grows
    for t in range(50):
        full.tick_features(["a"], feats(t, 1))
    assert len(full._inputs[full.states.slot_of("a")]) == 50


def test_drop_frees_the_slot_and_a_new_stream_starts_clean() -> None:
    learner = RFPLearner(cfg())
    for t in range(3):
        learner.tick_features(["a", "b"], feats(t, 2))
    slot = learner.states.slot_of("a")
    learner.drop("a")
    assert "a" not in learner.stream_ids()
    learner.tick_features(["c"], feats(5, 1))
    assert learner.states.slot_of("c") == slot
    assert int(learner.states.step[slot]) == 1 and int(learner.states.total[slot]) == 1


def test_segment_len_resets_streams_together_with_traces() -> None:
    """At its segment's end a stream starts over, step counter, state and traces together: its next
    fixation leaves it exactly as a new stream fed the same fixation in the same tick."""
    learner = RFPLearner(cfg(segment_len=3))
    steps = [int(learner.tick_features(["a"], feats(t, 1)).step[0]) for t in range(3)]
    slot = learner.states.slot_of("a")
    assert all(float(t[slot].abs().sum()) > 0 for t in learner.states.trace.values())  # something to reset
    out = learner.tick_features(["a", "new"], feats(3, 1).repeat(2, 1))  # the same fixation for both
    steps.append(int(out.step[0]))
    for name, x, y in zip(("h", "c", "step", *learner.states.trace), snapshot(learner, "a"),
                          snapshot(learner, "new"), strict=True):  # fmt: skip
        torch.testing.assert_close(x, y, msg=name)  # equal up to rounding: rows of one batch
    steps += [int(learner.tick_features(["a"], feats(t, 1)).step[0]) for t in range(4, 7)]
    assert steps == [1, 2, 3, 1, 2, 3, 1]


def test_rfp_and_bptt_segment_modes_take_the_same_step() -> None:
    # context whitening off and a loss without running statistics: BPTT re-scores a segment's steps
    # with the statistics at its end, RFP scored each step with those in force then (equal only
    # while the statistics stand still)
    kw = dict(update_mode="segment", segment_len=6, optimizer="sgd", lr=0.05, context_norm=False, loss="mse")
    rfp = RFPLearner(cfg(**kw), dtype=torch.float64)
    bptt = BPTTLearner(cfg(**kw), dtype=torch.float64)
    for t in range(12):
        u = feats(t).double()
        r, b = rfp.tick_features(["a", "b", "c"], u), bptt.tick_features(["a", "b", "c"], u)
        assert r.updated == b.updated
    assert rfp.updates_applied == bptt.updates_applied == 2
    for (name, p), q in zip(rfp.model.named_parameters(), bptt.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("learner_cls", [RFPLearner, BPTTLearner])
def test_segment_mode_refuses_streams_out_of_lockstep(learner_cls: type[StreamLearner]) -> None:
    """Segment mode steps when a stream ends its segment; a stream in the middle of its own would
    continue with traces (RFP) or a stored history (BPTT) from the old weights. The tick is refused
    before anything changes; lockstep streams (the test above) step as usual."""
    learner = learner_cls(cfg(update_mode="segment", segment_len=4, optimizer="sgd", lr=0.05))
    learner.tick_features(["a"], feats(0, 1))  # a is one fixation ahead of b
    for t in range(1, 3):
        learner.tick_features(["a", "b"], feats(t, 2)[:2])
    before = (snapshot(learner, "a"), snapshot(learner, "b"), learner.updates_applied)
    params = [p.clone() for p in learner.model.parameters()]
    with pytest.raises(InputError, match="lockstep"):  # a would end its segment, b reach step 3 of 4
        learner.tick_features(["a", "b"], feats(3, 2))
    assert same(snapshot(learner, "a"), before[0]) and same(snapshot(learner, "b"), before[1])
    assert learner.updates_applied == before[2]
    assert all(torch.equal(p, q) for p, q in zip(learner.model.parameters(), params, strict=True))
    with pytest.raises(InputError, match="lockstep"):  # a alone: b, not in the tick, is mid-segment
        learner.tick_features(["a"], feats(4, 1))


def test_a_checkpoint_of_a_learning_embedding_resumes_with_it_fixed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """embed_lr_scale is a learning setting: a checkpoint written while E learned (with E's
    accumulated gradient) loads into a learner whose E is fixed (no .grad), and the reverse."""
    for writer, reader in ((1.0, 0.0), (0.0, 1.0)):
        a = RFPLearner(cfg(embed_lr_scale=writer, update_mode="segment", segment_len=0))
        for t in range(5):
            a.tick_features(["x", "y"], feats(t, 2))
        save_checkpoint(tmp_path / "ck.pt", a)
        b = RFPLearner(cfg(embed_lr_scale=reader, update_mode="segment", segment_len=0))
        load_checkpoint(tmp_path / "ck.pt", b)
        assert torch.equal(b.model.E.weight, a.model.E.weight)
        assert (b.model.E.weight.grad is None) == (reader == 0.0)
        b.tick_features(["x", "y"], feats(5, 2))  # and it goes on learning
