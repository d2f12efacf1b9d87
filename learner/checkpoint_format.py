"""The checkpoint folder's format: its names and version, and what writing and reading it share.

The layout and the commit rule are drawn in ``learner/checkpoint.py`` (the module to import); the
folder is written by ``learner/checkpoint_write.py`` and read by ``learner/checkpoint.py``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from learner.errors import CheckpointError
from learner.streaming import StreamLearner

FORMAT = "foveate-checkpoint"
VERSION = 4  # 2: context-list embedding, 3 optimizer groups; 3: rgc_inputs (issue 11); 4: a folder (issue 16)
MANIFEST = "manifest.json"
STREAMS = "streams"


def trunk_fingerprint(learner: StreamLearner) -> str:
    """SHA-256 of the frozen trunk's weights (cached: they never change).

    Taken at bfloat16 precision, the trunk's dtype on CUDA, so that the same weights give the same
    fingerprint on every device and a checkpoint written on a GPU loads on a CPU and back.
    """
    cached = getattr(learner, "_trunk_fingerprint", None)
    if cached is None:
        digest = hashlib.sha256()
        for name, tensor in sorted(learner.model.trunk.state_dict().items()):
            digest.update(name.encode())
            rounded = tensor.detach().to("cpu")
            if rounded.is_floating_point():
                rounded = rounded.to(torch.bfloat16).to(torch.float32)
            digest.update(rounded.contiguous().numpy().tobytes())
        cached = digest.hexdigest()
        learner._trunk_fingerprint = cached  # type: ignore[attr-defined]
    return cached


@dataclass
class Committed:
    """What the learner last committed to a store: the base of the next, incremental, checkpoint."""

    path: Path  # resolved
    generation: int
    files: dict[str, str]  # stream id -> its file in streams/
    stamp: tuple[int, int]  # the manifest's (inode, mtime): another writer since then means a full write


def has_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a committed checkpoint (or an old single file, which loading refuses)."""
    path = Path(path)
    return path.is_file() or (path / MANIFEST).is_file()


def stamp(path: Path) -> tuple[int, int]:
    """The manifest's (inode, mtime): changed by any commit, ours or another writer's."""
    st = (path / MANIFEST).stat()
    return st.st_ino, st.st_mtime_ns


def refuse_old_file(path: Path) -> None:
    """Raise ``CheckpointError`` with what to do when ``path`` is an older foveate's single file."""
    if path.is_file():
        raise CheckpointError(
            f"{path} is a single-file checkpoint of an older foveate (format version 3 or before); this "
            f"foveate keeps a checkpoint folder there (version {VERSION}). Move the file away (learning "
            "then starts afresh) or point FOVEATE_CHECKPOINT_PATH elsewhere"
        )
