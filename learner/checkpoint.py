"""Checkpoints: a folder of files, committed by one manifest, written beside the tick loop, incrementally.

On disk, at ``path`` (a folder)::

    manifest.json                  the commit point, written last: names every file below
    core-<gen>.pt                  weights, optimizer, counters, running whitenings, segment gradient,
                                   ModelConfig, ``extra``
    streams/<id hash>-<gen>.pt     one stream's rows (h, c, traces, ...) as written at generation <gen>

A checkpoint is taken in two halves. :func:`take_snapshot` is all the tick loop waits for: copies of
the small state (the weights and the optimizer: a few MB), ``extra``, and a ``RowSnapshot`` of the
streams that changed since the previous checkpoint (copy on write, ``learner/snapshot.py``: nothing
of the ~1.1 MB per stream is copied then). :func:`write_snapshot` runs in any thread: it writes the
changed streams' files and the core file, fsyncs them, then the manifest (temporary file, fsync,
rename, fsync of the folder). Until that rename the previous manifest, and every file it names, is
the checkpoint; after it the new one; a crash at any point leaves one of the two, never a mix: a new
generation's files never replace a file the committed manifest names. Files that no manifest names
(the previous generation's, a crashed write's) are deleted after the commit. An unchanged stream is
named again from the previous manifest, so only the changed ones are written.

Read with ``torch.load(weights_only=True)`` (and JSON): plain containers and tensors only, no
arbitrary unpickling. A spilled stream's file (``learner/state.py``) has the layout of a stream file
and is never rewritten, so a changed spilled stream is hard-linked into the folder, not copied.

The frozen trunk is not stored (it is rebuilt from the config); a fingerprint of its weights is, and
a checkpoint whose architecture or trunk differs from the configured model is refused with
``ArchitectureMismatch`` rather than silently re-initialised. ``extra`` carries the service's
bookkeeping (per-stream sequence numbers, queue offsets), saved atomically with the state it describes.
A single-file checkpoint of an older foveate (version 3 and before) is refused with a message.

The ranks of a distributed learner write one such folder together (``learner/dist_checkpoint.py``:
each rank its streams, rank 0 the core and the manifest); its manifest adds ``ranks``, and this
module loads it into one learner as any other (``keep`` loads some streams only).

The folder's names and version are in ``learner/checkpoint_format.py``, writing (``take_snapshot``,
``write_snapshot``, ``save_checkpoint``) in ``learner/checkpoint_write.py``; reading is here, and this
module is the one to import: it carries the whole API.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from learner.checkpoint_format import (
    FORMAT,
    MANIFEST,
    STREAMS,
    VERSION,
    Committed,
    has_checkpoint,
    refuse_old_file,
    stamp,
    trunk_fingerprint,
)
from learner.checkpoint_write import Snapshot, save_checkpoint, take_snapshot, write_snapshot
from learner.config import ModelConfig
from learner.errors import ArchitectureMismatch, CheckpointError
from learner.streaming import StreamLearner

__all__ = [
    "FORMAT",
    "MANIFEST",
    "STREAMS",
    "VERSION",
    "Committed",
    "Snapshot",
    "has_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "read_state",
    "save_checkpoint",
    "take_snapshot",
    "trunk_fingerprint",
    "write_snapshot",
]

log = logging.getLogger(__name__)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a checkpoint's manifest without applying it."""
    path = Path(path)
    refuse_old_file(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path} (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / MANIFEST} is not readable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a foveate checkpoint")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {manifest.get('version')}, this foveate reads {VERSION}"
        )
    return manifest


def _load(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is named by the manifest but missing") from None
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"{file} is not a readable checkpoint file: {exc}") from exc


def _stream_rows(path: Path, streams: list[list[str]]) -> Iterator[dict[str, Any]]:
    for sid, name in streams:
        rows = _load(path / STREAMS / name)
        if not isinstance(rows, dict) or rows.get("id") != sid:
            raise CheckpointError(f"{path / STREAMS / name} does not hold stream {sid!r}")
        yield rows


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything a checkpoint holds, without a learner (for tools and tests): ``manifest``,
    ``state`` (``StreamLearner.state_dict`` but ``streams``: {stream id: {name: tensor}}), ``extra``."""
    path = Path(path)
    manifest = read_checkpoint(path)
    core = _load(path / manifest["core"])
    extra = core.pop("extra", {})
    streams = {}
    for rows in _stream_rows(path, manifest["streams"]):
        sid = rows.pop("id")
        streams[sid] = rows
    return {"manifest": manifest, "state": {**core, "streams": streams}, "extra": extra}


def load_checkpoint(
    path: str | os.PathLike[str],
    learner: StreamLearner,
    *,
    keep: Callable[[str], bool] | None = None,
    manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore ``learner`` from ``path``; return the checkpoint's ``extra``.

    ``keep`` (a stream id -> whether to load it) restores some of the streams only: a rank of a
    distributed learner keeps its partition (``learner/dist_checkpoint.py``), which also passes the
    ``manifest`` it has read already. Raises ``ArchitectureMismatch`` when the checkpoint was written
    by another architecture, another learner type, or another trunk; learning settings (lr, update
    mode, ...) follow the configured learner, not the checkpoint.
    """
    path = Path(path)
    if manifest is None:
        manifest = read_checkpoint(path)
    saved = ModelConfig.from_dict(manifest["config"])
    ours = learner.cfg
    diff = {
        k: (v, ours.architecture()[k]) for k, v in saved.architecture().items() if ours.architecture()[k] != v
    }
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs configured {b!r}" for k, (a, b) in diff.items())
        raise ArchitectureMismatch(f"{path} was written by another architecture ({detail})")
    if manifest["learner"] != type(learner).__name__:
        raise ArchitectureMismatch(f"{path} holds a {manifest['learner']}, not a {type(learner).__name__}")
    if manifest["trunk_fingerprint"] != trunk_fingerprint(learner):
        raise ArchitectureMismatch(
            f"{path} was trained on other trunk weights than the configured ones "
            f"(trunk_weights={ours.trunk_weights!r}, seed={ours.seed})"
        )
    core = _load(path / manifest["core"])
    extra = core.pop("extra", {})
    streams = manifest["streams"]
    if keep is not None:
        streams = [[sid, name] for sid, name in streams if keep(sid)]
        if "windows" in core:  # BPTTLearner keeps each stream's window in the core
            core["windows"] = {sid: w for sid, w in core["windows"].items() if keep(sid)}
    try:
        learner.load_state_dict({**core, "streams": _stream_rows(path, streams)})
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is malformed: {exc}") from exc
    # learning settings follow the configuration
    for group, lr in zip(learner.optimizer.param_groups, learner.group_lrs(), strict=True):
        group["lr"] = lr
        group["weight_decay"] = ours.weight_decay
    states = learner.states
    states.dirty.clear()  # every stream is as its file holds it
    files = {sid: name for sid, name in streams}
    states.checkpoint_base = Committed(path.resolve(), manifest["generation"], files, stamp(path))
    log.info(
        "checkpoint restored: %s (%d streams, %d updates)", path, len(learner.states), learner.updates_applied
    )
    return dict(extra)
