"""Tracemalloc snapshots of a server process, for ``python -m bench.soak --tracemalloc S``.

The soak puts this folder first on the server's ``PYTHONPATH``, so that Python imports this module at
start-up. With ``FOVEATE_BENCH_TRACEMALLOC_DIR`` set, a daemon thread waits for a file ``start`` in
that folder (the soak writes it when its load begins: tracing the start-up's imports made the server
miss its 180 s to get ready), then starts :mod:`tracemalloc` (one frame) and writes a snapshot every
``FOVEATE_BENCH_TRACEMALLOC_S`` seconds (``snap-0000.pickle``, ...), which the soak diffs. Python's
own allocations only: tensors and other native buffers do not appear (compare the snapshots' total
with RSS). Tracing slows the server down: use it to find what grows, not to measure.
"""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from pathlib import Path


def _keep_snapshots(folder: Path, every_s: float) -> None:
    while not (folder / "start").exists():
        time.sleep(0.5)
    tracemalloc.start(1)
    n = 0
    while True:
        time.sleep(every_s)
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        tmp = folder / f"snap-{n:04d}.pickle.tmp"
        snap.dump(str(tmp))
        tmp.rename(folder / f"snap-{n:04d}.pickle")  # the soak reads whole snapshots only
        n += 1


_folder = os.environ.get("FOVEATE_BENCH_TRACEMALLOC_DIR")
if _folder:
    Path(_folder).mkdir(parents=True, exist_ok=True)
    every = float(os.environ.get("FOVEATE_BENCH_TRACEMALLOC_S", "30"))
    threading.Thread(
        target=_keep_snapshots, args=(Path(_folder), every), daemon=True, name="memtrace"
    ).start()
