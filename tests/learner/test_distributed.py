"""Data-parallel learning across gloo ranks (learner/distributed.py), with real spawned processes.

2 and 3 ranks on 127.0.0.1 (RFP; BPTT with a window on 2), each learning from its partition of
the streams (``service.shards``) over many ticks, some of which give a rank no fixation at all:
every rank ends with bit-identical shared state (weights, Adam moments, running whitening
statistics), equal to one learner that ticked every stream in the same ticks; every stream's errors
match that learner's. A rank that exits, or stalls, makes the others raise ``RankLost`` instead of
hanging; ranks that start from different models, or whose ticks go out of step, are refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from learner.config import ModelConfig
from learner.distributed import idle_tick, join, shared_state
from learner.errors import ConfigError
from learner.rfp import RFPLearner
from tests.learner import _ranks

TICKS = 60
# a process that does not finish within this is a hang (the collective timeouts are 10 s and 120 s;
# pytest-timeout's 600 s would kill the test without saying which rank hung)
JOIN_BOUND_S = 400


def _spawn(
    tmp_path: Path,
    world: int,
    role: str = "play",
    timeout_s: float = 120,
    kind: str = "rfp",
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Run ``world`` ranks to the end; return each one's result file (rank order; with ``exit`` or
    ``stall`` the last rank leaves none)."""
    return _ranks.run_ranks(
        _ranks.rank_main,
        lambda r, port: (r, world, port, str(tmp_path), TICKS, role, timeout_s, kind, device),
        world,
        lambda r: tmp_path / f"rank{r}.pt",
        survivors=world - 1 if role in ("exit", "stall") else None,
        join_bound_s=JOIN_BOUND_S,
    )


def _assert_same(a: Any, b: Any, *, exact: bool, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], exact=exact, where=f"{where}/{k}")
    elif torch.is_tensor(a):
        if exact:
            assert torch.equal(a, b), f"{where} differs"
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"{where} differs")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "world"), [("rfp", 2), ("rfp", 3), ("bptt", 2)])
def test_ranks_stay_identical_and_equal_one_learner(tmp_path: Path, kind: str, world: int) -> None:
    results = _spawn(tmp_path, world, kind=kind)
    plan = _ranks.schedule(TICKS, world)
    owners = {sid: _ranks.rank_of(sid, world) for tick in plan for sid, _, _ in tick}
    assert set(owners.values()) == set(range(world)), "every rank must own streams"
    for r in range(world):  # the schedule gives each rank ticks without any fixation
        assert any(all(owners[sid] != r for sid, _, _ in tick) for tick in plan)
    for res in results[1:]:
        assert res["fingerprint"] == results[0]["fingerprint"]
        _assert_same(res["shared"], results[0]["shared"], exact=True)
    one = _ranks.new_learner(kind)
    errors = _ranks.play(one, plan, None, world)
    assert one.updates_applied > TICKS // 2  # the whitened loss has learned in most ticks
    assert one.updates_applied == results[0]["shared"]["updates"]
    # the running statistics observe the same rows in the same order: exact; the gradients agree up
    # to rounding (each rank's n * mean instead of one sum), so the weights do too
    norms = {k: v for k, v in shared_state(one)["weights"].items() if "norm" in k or k == "change_sq"}
    assert norms, "the model has running statistics"
    ranked = results[0]["shared"]
    _assert_same(shared_state(one), ranked, exact=False)
    for res in results:
        for sid, errs in res["errors"].items():
            assert owners[sid] == res["rank"]
            torch.testing.assert_close(
                torch.tensor(errs), torch.tensor(errors[sid]), rtol=1e-9, atol=1e-12, equal_nan=True
            )
    assert sum(len(res["errors"]) for res in results) == len(errors)


@pytest.mark.gpu
def test_nccl_ranks_on_cuda_stay_identical_and_equal_one_cpu_learner(tmp_path: Path) -> None:
    """The NCCL path: rank r on GPU r (2 ranks where there are 2 GPUs, else a group of one, which
    still runs every collective through NCCL on CUDA tensors), against one float64 CPU learner."""
    world = min(2, torch.cuda.device_count())
    results = _spawn(tmp_path, world, device="cuda")
    for res in results[1:]:
        assert res["fingerprint"] == results[0]["fingerprint"]
        _assert_same(res["shared"], results[0]["shared"], exact=True)
    one = _ranks.new_learner("rfp")
    errors = _ranks.play(one, _ranks.schedule(TICKS, world), None, world)
    assert one.updates_applied == results[0]["shared"]["updates"] > TICKS // 2
    for name, value in shared_state(one)["weights"].items():  # CUDA kernels round differently
        torch.testing.assert_close(results[0]["shared"]["weights"][name], value, rtol=1e-6, atol=1e-9)
    for res in results:
        for sid, errs in res["errors"].items():
            torch.testing.assert_close(torch.tensor(errs), torch.tensor(errors[sid]), rtol=1e-6, atol=1e-9,
                                       equal_nan=True)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("role", ["exit", "stall"])
def test_a_lost_rank_is_reported_not_hung(tmp_path: Path, role: str) -> None:
    results = _spawn(tmp_path, 3, role, timeout_s=10)
    for res in results:
        lost = res["lost"]
        assert (
            f"rank {res['rank']} of 3" in lost
            and "another rank exited, or stalled past the 10 s timeout" in lost
        )
        tick = int(lost.split("learning tick ")[1].split(":")[0])
        assert tick > TICKS // 2  # the ticks before the loss were all taken


def test_join_refuses_ranks_with_different_models(tmp_path: Path) -> None:
    results = _spawn(tmp_path, 2, "differ")
    for res in results:
        assert "ranks [1] hold another model than rank 0" in res["refused"]


def test_ranks_out_of_step_are_refused(tmp_path: Path) -> None:
    results = _spawn(tmp_path, 2, "skew")
    for res in results:
        assert "ranks out of lockstep: their learning ticks are [1, 6]" in res["refused"]
        assert res["shared"]["updates"] == 0  # refused before anything changed


@pytest.fixture
def group_of_one(tmp_path: Path) -> Iterator[None]:
    """This process as a gloo group of one (a file store: no port)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_group_of_one_learns_as_one_learner(group_of_one: None) -> None:
    """In process: the synced learner follows the plain one to rounding; an idle tick changes nothing
    shared but the tick count; segment mode is refused."""
    plan = _ranks.schedule(40, 1)  # the whitened loss learns from about the 25th tick
    plain, synced = (RFPLearner(ModelConfig(**_ranks.SMALL), dtype=torch.float64) for _ in range(2))
    sync = join(synced)
    _ranks.play(plain, plan, None, 1)
    _ranks.play(synced, plan, 0, 1)
    assert sync.ticks == 40 and synced.updates_applied == plain.updates_applied > 0
    _assert_same(shared_state(synced), shared_state(plain), exact=False)
    before = shared_state(synced)
    idle_tick(synced)
    assert sync.ticks == 41
    _assert_same(shared_state(synced), before, exact=True)
    with pytest.raises(ConfigError, match="every_fixation"):
        join(RFPLearner(ModelConfig(**_ranks.SMALL, update_mode="segment")))


def test_join_needs_a_process_group() -> None:
    with pytest.raises(ConfigError, match="init_process_group"):
        join(RFPLearner(ModelConfig(**_ranks.SMALL)))
