"""bench.ceiling's retrieval ceiling ranks the true next patch as each rule says."""

from __future__ import annotations

import torch

from bench.ceiling import RULES, retrieval_ceiling
from bench.controls import RetrievalSet, Scanpath


def rotating_paths(n_paths: int, length: int, seed: int) -> tuple[list[Scanpath], torch.Tensor]:
    """Scanpaths in which the next feature vector is a fixed rotation of the current one (plus a
    little noise): a predictor can learn it, "the same again" cannot."""
    gen = torch.Generator().manual_seed(seed)
    rot, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    paths = []
    for k in range(n_paths):
        u = [torch.randn(6, generator=gen)]
        for _ in range(length - 1):
            u.append(rot @ u[-1] + 0.05 * torch.randn(6, generator=gen))
        paths.append(Scanpath(str(k % 3), f"im{k}", torch.stack(u)))
    return paths, rot


def test_a_learnable_transition_is_retrieved_by_the_ridge_and_not_by_repeat() -> None:
    train, _ = rotating_paths(40, 12, seed=1)
    test, _ = rotating_paths(30, 12, seed=2)
    gen = torch.Generator().manual_seed(3)
    steps = [int(torch.randint(1, 12, (1,), generator=gen)) for _ in test]
    rs = RetrievalSet(list(range(len(test))), steps, torch.randn(len(test), 9, 6, generator=gen))
    got = retrieval_ceiling(train, test, rs, lambda x: x.double(), ridge=1.0, epochs=2)
    assert set(got) == set(RULES) | {f"{r} - repeat" for r in RULES[1:]}
    assert got["ridge"][0] >= 0.9 and got["ridge, likelihood ratio"][0] >= 0.9
    assert got["repeat"][0] <= 0.5  # the rotation moves the next vector away from the current one
    for rule in RULES[1:]:  # the paired lead is the difference of the two accuracies
        assert abs(got[f"{rule} - repeat"][0] - (got[rule][0] - got["repeat"][0])) < 1e-9
    for mean, sem in (got[r] for r in RULES):
        assert 0.0 <= mean <= 1.0 and sem >= 0.0
