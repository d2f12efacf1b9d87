"""Fixtures of the service tests (helpers live in ``_support.py``).

``osie``        three short OSIE scanpaths: frame JPEG and array, gaze points, 64 px patches.
``embedded``    the embedded service (API + worker thread) on a real uvicorn in a thread, per module.
``processes``   a list to register ``ServiceProcess`` objects in; all are killed at teardown.
"""

from __future__ import annotations

import csv
import signal
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.service._support import Scanpath, ServiceProcess, ThreadedServer, small_settings

#: Limits of the ``embedded`` server, small enough for tests to cross them cheaply.
EMBEDDED_LIMITS = {
    "max_streams": 50,
    "max_pixels": 1_000_000,
    "max_body_bytes": 2_000_000,
    "max_batch_fixations": 8,
}


@pytest.fixture(scope="session")
def osie(shared_osie: Path) -> list[Scanpath]:
    """Three short scanpaths (at most 6 fixations each) of two OSIE images."""
    from learner.patches import cut_patch

    wanted = [("1001.jpg", "1"), ("1001.jpg", "2"), ("1002.jpg", "1")]
    rows: dict[tuple[str, str], list[tuple[float, float, float]]] = {key: [] for key in wanted}
    with open(shared_osie / "fixations.csv", newline="") as f:
        for row in csv.DictReader(f):
            key = (row["image"], row["subject"])
            if key in rows and len(rows[key]) < 6:
                rows[key].append((float(row["x_px"]), float(row["y_px"]), float(row["duration_ms"])))
            if row["image"] > "1002.jpg":
                break
    out = []
    for image, subject in wanted:
        jpeg = (shared_osie / "stimuli" / image).read_bytes()
        frame = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        fixations = rows[(image, subject)]
        patches = [cut_patch(frame, x, y, 64) for x, y, _ in fixations]
        out.append(Scanpath(image, subject, jpeg, frame, fixations, patches))
    return out


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    """The embedded service (API + worker thread, in-process queue) on a real uvicorn, per module."""
    from service.api.main import create_app

    ckpt = tmp_path_factory.mktemp("embedded") / "ckpt.pt"
    server = ThreadedServer(create_app(small_settings(checkpoint_path=ckpt, **EMBEDDED_LIMITS))).start()
    yield server
    server.stop()


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    """A list to register started processes in; each is stopped (SIGKILL) at teardown."""
    started: list[ServiceProcess] = []
    yield started
    for proc in started:
        proc.stop(signal.SIGKILL, timeout=10)
