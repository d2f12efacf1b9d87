"""Tracemalloc snapshots of a server process, for ``python -m bench.soak --tracemalloc S``.

The soak puts this folder first on the server's ``PYTHONPATH``, so that Python imports this module at
start-up; with ``FOVEATE_BENCH_TRACEMALLOC_DIR`` set it starts :mod:`tracemalloc` (4 frames) and a
daemon thread that writes a snapshot there every ``FOVEATE_BENCH_TRACEMALLOC_S`` seconds
(``snap-0000.pickle``, ...), which the soak diffs. Python's own allocations only: tensors and other
native buffers do not appear (compare the snapshots' total with RSS). Tracing slows the server down;
use it to find what grows, not to measure.
"""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from pathlib import Path


def _keep_snapshots(folder: Path, every_s: float) -> None:
    n = 0
    while True:
        time.sleep(every_s)
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>")]
        )
        tmp = folder / f"snap-{n:04d}.pickle.tmp"
        snap.dump(str(tmp))
        tmp.rename(folder / f"snap-{n:04d}.pickle")  # the soak reads whole snapshots only
        n += 1


_folder = os.environ.get("FOVEATE_BENCH_TRACEMALLOC_DIR")
if _folder:
    Path(_folder).mkdir(parents=True, exist_ok=True)
    tracemalloc.start(4)
    every = float(os.environ.get("FOVEATE_BENCH_TRACEMALLOC_S", "30"))
    threading.Thread(
        target=_keep_snapshots, args=(Path(_folder), every), daemon=True, name="memtrace"
    ).start()
