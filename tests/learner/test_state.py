"""Bounded stream state (learner/state.py): chunks that are never copied, freed slots and chunks,
a cap, and idle streams spilled to disk and read back bit for bit."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from learner import RFPLearner, StreamLearner
from learner.errors import StateFull
from learner.state import StreamStates

from .test_conformance import cfg, feats


def play(learner: StreamLearner, ids: list[str], ticks: int, seed: int = 0) -> None:
    """A random schedule: each tick one to three of ``ids``, features from a fixed generator."""
    rng = random.Random(seed)
    for t in range(ticks):
        batch = rng.sample(ids, rng.randint(1, 3))
        learner.tick_features(batch, feats(1000 + t, len(batch)), reset=[rng.random() < 0.05] * len(batch))


def assert_same(a: StreamLearner, b: StreamLearner) -> None:
    assert sorted(a.stream_ids()) == sorted(b.stream_ids())
    for sid in a.stream_ids():
        ra, rb = a.states.row(sid), b.states.row(sid)
        assert ra.keys() == rb.keys()
        for name in ra:
            assert torch.equal(ra[name], rb[name]), (sid, name)
    wa, wb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_spilled_streams_come_back_bit_identical(tmp_path: Path) -> None:
    ids = [f"s{i}" for i in range(7)]
    free = RFPLearner(cfg())
    capped = RFPLearner(cfg())
    capped.states.chunk = 2
    capped.states.limit(3, tmp_path / "spill")
    play(free, ids, 60)
    play(capped, ids, 60)
    st = capped.states
    assert st.spills > 10 and st.unspills > 10  # streams did move to disk and back
    assert st.resident <= 3 and st.resident + st.spilled == len(ids)
    assert len(list((tmp_path / "spill").iterdir())) == st.spilled
    assert_same(free, capped)
    # a checkpoint holds the spilled streams too
    again = RFPLearner(cfg())
    again.load_state_dict(capped.state_dict())
    assert_same(free, again)


def test_chunks_are_never_copied_and_empty_ones_are_released() -> None:
    learner = RFPLearner(cfg())
    st = learner.states
    st.chunk = 4
    learner.tick_features([f"a{i}" for i in range(4)], feats(0, 4))
    first = st.trace["W"].data_ptrs()
    per_chunk = st.allocated_bytes()
    learner.tick_features([f"b{i}" for i in range(4)], feats(1, 4))  # fills a second chunk
    assert st.trace["W"].data_ptrs()[0] == first[0]
    assert st.allocated_bytes() == 2 * per_chunk
    for i in range(4):
        learner.drop(f"a{i}")
    assert st.trace["W"].chunks[0] is None and st.allocated_bytes() == per_chunk
    learner.tick_features(["c"], feats(2, 1))  # a chunk comes back for it, at the lowest slot
    assert st.slot_of("c") == 0 and st.allocated_bytes() == 2 * per_chunk


def test_streams_across_chunks_learn_like_one_slab() -> None:
    ids = [f"s{i}" for i in range(6)]
    one = RFPLearner(cfg(), batched_traces=True)
    many = RFPLearner(cfg(), batched_traces=True)
    many.states.chunk = 2  # every tick of 2-3 streams spans chunks
    play(one, ids, 40, seed=2)
    play(many, ids, 40, seed=2)
    assert_same(one, many)


def test_a_full_state_without_spill_folder_refuses_new_streams() -> None:
    st = StreamStates(n_units=4, embed_dim=3, chunk=2, max_resident=2)
    st.slots(["a", "b"])
    assert not st.can_admit(1)
    with pytest.raises(StateFull):
        st.slots(["c"])
    st.drop("a")
    assert st.can_admit(1)
    st.slots(["c"])


def test_limit_memory_rounds_to_whole_chunks(tmp_path: Path) -> None:
    learner = RFPLearner(cfg())
    per = learner.memory_per_stream()
    assert learner.limit_memory(200 * per) == 192  # three chunks of 64
    assert learner.limit_memory(10 * per, tmp_path) == 10  # under one chunk: smaller chunks
    assert learner.states.chunk == 10


def test_a_tick_larger_than_the_cap_is_refused_and_loses_nothing(tmp_path: Path) -> None:
    learner = RFPLearner(cfg())
    learner.states.chunk = 2
    learner.states.limit(2, tmp_path)
    for t in range(2):
        for sid in "abcd":
            learner.tick_features([sid], feats(t * 4 + ord(sid), 1))
    before = {sid: learner.states.row(sid) for sid in "abcd"}
    with pytest.raises(StateFull):
        learner.tick_features(list("abcd"), feats(99, 4))
    for sid in "abcd":
        after = learner.states.row(sid)
        assert all(torch.equal(before[sid][k], after[k]) for k in after), sid
