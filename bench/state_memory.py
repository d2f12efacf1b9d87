"""Resident memory of the stream state at growing stream counts, and after deleting a third of them.

The default model on the CPU, trunk features fed directly (``tick_features``: the trunk's cost is not
what is measured). Each new stream gets one learning fixation; RSS is read from /proc after each
target count. With ``--max-state-mb`` the state is capped and the least recently used streams spill
to a temporary folder.

Run::

    python -m bench.state_memory --streams 100 1000 5000
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time

import torch

from learner.config import ModelConfig
from learner.rfp import RFPLearner


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[100, 1000, 5000])
    ap.add_argument("--max-state-mb", type=int, default=None, help="cap (MB); spill beyond it")
    ap.add_argument("--batch", type=int, default=64, help="new streams per tick")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    learner = RFPLearner(ModelConfig())
    per = learner.memory_per_stream()
    with tempfile.TemporaryDirectory() as spill:
        cap = None
        if args.max_state_mb is not None:
            cap = learner.limit_memory(args.max_state_mb * 2**20, spill)
        print(f"bytes per stream: {per:,} ({per / 2**20:.2f} MB); chunk {learner.states.chunk} streams; "
              f"cap {cap if cap is not None else 'none'} streams resident")  # fmt: skip
        head = (
            ("streams", 8),
            ("resident", 9),
            ("spilled", 8),
            ("state MB", 9),
            ("RSS MB", 8),
            ("s/new tick", 11),
            ("at tick", 8),
        )
        print(" ".join(f"{name:>{width}}" for name, width in head))
        gc.collect()
        print(f"{0:>8} {0:>9} {0:>8} {0:>9.0f} {rss_mb():>8.0f} {'':>11} {'':>8}")
        made = ticks = 0
        for target in args.streams:
            worst, worst_at = 0.0, 0
            while made < target:
                n = min(args.batch, target - made)
                ids = [f"s{made + i}" for i in range(n)]
                t0 = time.perf_counter()
                learner.tick_features(ids, torch.randn(n, learner.cfg.M))
                ticks += 1
                if time.perf_counter() - t0 > worst:
                    worst, worst_at = time.perf_counter() - t0, ticks
                made += n
            st = learner.states
            # the slowest tick is the input whitening's eigendecomposition (M x M), after learning
            # tick 1, 2, 4, ... and then every 256th once the samples outnumber M: not the streams
            print(f"{made:>8} {st.resident:>9} {st.spilled:>8} {st.allocated_bytes() / 2**20:>9.0f} "
                  f"{rss_mb():>8.0f} {worst:>11.3f} {worst_at:>8}")  # fmt: skip
        for sid in learner.stream_ids()[::3]:
            learner.drop(sid)
        gc.collect()
        st = learner.states
        print(f"after deleting every third stream: {len(st)} streams, "
              f"state {st.allocated_bytes() / 2**20:.0f} MB, RSS {rss_mb():.0f} MB")  # fmt: skip
        for sid in learner.stream_ids()[: len(st) // 2]:
            learner.drop(sid)
        gc.collect()
        print(f"after deleting the older half of the rest: {len(st)} streams, "
              f"state {st.allocated_bytes() / 2**20:.0f} MB, RSS {rss_mb():.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
