"""service/shards.py: the stream-to-rank rule that the API and every worker rank must agree on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from service.shards import rank_of, shard_key

IDS = [f"key{k}/participant-{i}" for k in range(4) for i in range(5000)]


def test_the_same_rank_in_every_process() -> None:
    """Python's hash() of a str changes with PYTHONHASHSEED; rank_of must not."""
    code = (
        "import json, sys; from service.shards import rank_of; "
        "print(json.dumps([rank_of(s, 5) for s in sys.argv[1:]]))"
    )
    sample = IDS[:300:3]
    here = [rank_of(s, 5) for s in sample]
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code, *sample], env=env, capture_output=True, check=True)
        assert json.loads(out.stdout) == here


def test_balanced_and_in_range() -> None:
    for ranks in (1, 2, 3, 4):
        counts = Counter(rank_of(s, ranks) for s in IDS)
        assert set(counts) == set(range(ranks))
        for n in counts.values():  # 20,000 ids: a fair share within 5 %
            assert abs(n / len(IDS) - 1 / ranks) < 0.05 / ranks


def test_one_more_rank_moves_only_what_it_takes_over() -> None:
    for ranks in (2, 3):
        before = {s: rank_of(s, ranks) for s in IDS}
        after = {s: rank_of(s, ranks + 1) for s in IDS}
        moved = [s for s in IDS if before[s] != after[s]]
        assert {after[s] for s in moved} == {ranks}  # only to the new rank
        assert abs(len(moved) / len(IDS) - 1 / (ranks + 1)) < 0.02


def test_bad_arguments_and_shard_names() -> None:
    with pytest.raises(ValueError, match="buckets must be >= 1"):
        rank_of("a", 0)
    assert shard_key("foveate:fixations", 2) == "foveate:fixations:2"
    assert len({shard_key("foveate:control", r) for r in range(8)}) == 8
    with pytest.raises(ValueError, match="rank must be >= 0"):
        shard_key("foveate:control", -1)
