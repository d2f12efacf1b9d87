"""Writing a checkpoint: a snapshot the tick loop waits for, then its files and manifest, in any thread.

A checkpoint is taken in two halves. :func:`take_snapshot` is all the tick loop waits for: copies of
the small state (the weights and the optimizer: a few MB), ``extra``, and a ``RowSnapshot`` of the
streams that changed since the previous checkpoint (copy on write, ``learner/snapshot.py``: nothing
of the ~1.1 MB per stream is copied then). :func:`write_snapshot` runs in any thread: it writes the
changed streams' files and the core file, fsyncs them, then the manifest (temporary file, fsync,
rename, fsync of the folder). The folder's layout and the commit rule are in ``learner/checkpoint.py``;
import these names from there.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from learner.checkpoint_format import (
    FORMAT,
    MANIFEST,
    STREAMS,
    VERSION,
    Committed,
    refuse_old_file,
    stamp,
    trunk_fingerprint,
)
from learner.errors import CheckpointError
from learner.snapshot import RowSnapshot, cloned
from learner.streaming import StreamLearner

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """One checkpoint taken (``take_snapshot``) and not yet written (``write_snapshot``)."""

    path: Path
    manifest: dict[str, Any]
    core: dict[str, Any]  # copies: the loop goes on changing the originals
    rows: RowSnapshot | None  # the changed resident streams (slot -> id), read copy-on-write
    names: dict[str, str]  # stream id -> file, for every stream written in this generation
    loaded: dict[str, dict[str, Any]] = field(default_factory=dict)  # spilled ones that could not be linked
    linked: int = 0  # spilled streams hard-linked at the snapshot
    learner: StreamLearner | None = None


def _digest(stream_id: str) -> str:
    return hashlib.sha256(stream_id.encode()).hexdigest()[:32]


def _generation_on_disk(path: Path) -> int:
    """The greatest generation the manifest or any file in the folder carries (0: none)."""
    gens = [0]
    try:
        gens.append(int(json.loads((path / MANIFEST).read_text())["generation"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no readable manifest: the file names below still tell which generations were used
    for f in [*path.glob("core-*.pt"), *(path / STREAMS).glob("*-*.pt")]:
        tail = f.stem.rsplit("-", 1)[-1]
        if tail.isdigit():
            gens.append(int(tail))
    return max(gens)


def next_generation(path: str | os.PathLike[str], learner: StreamLearner) -> int:
    """The generation the learner's next checkpoint at ``path`` takes: one past its last commit
    there, or past every generation in the folder when it has none (or another writer came since)."""
    path = Path(path)
    base = _base(path, learner)
    return (_generation_on_disk(path) if base is None else base.generation) + 1


def _base(path: Path, learner: StreamLearner) -> Committed | None:
    """The learner's last commit at ``path``, if nobody wrote there since (else every stream is written)."""
    base = learner.states.checkpoint_base
    if not isinstance(base, Committed) or base.path != path.resolve() or _stamp_or_none(path) != base.stamp:
        return None
    return base


def take_snapshot(
    path: str | os.PathLike[str],
    learner: StreamLearner,
    extra: dict[str, Any] | None = None,
    *,
    generation: int | None = None,
) -> Snapshot:
    """The in-memory half of a checkpoint: fast, and what the caller must hold the learner still for.

    After it the learner may tick on (in another thread than ``write_snapshot``'s, or not): the
    snapshot keeps the state of this instant. At most one snapshot per learner is in flight.
    ``generation`` (at least ``next_generation``) is for writers that agree on one: the ranks of a
    distributed learner (``learner/dist_checkpoint.py``).
    """
    path = Path(path)
    refuse_old_file(path)
    states = learner.states
    if states.writing:
        raise CheckpointError("a checkpoint of this learner is still being written")
    (path / STREAMS).mkdir(parents=True, exist_ok=True)
    try:
        snap = _take(path, learner, extra, generation)
    except BaseException:
        states.checkpoint_base = None  # the changed streams were forgotten: the next write has them all
        raise
    states.writing = True
    return snap


def _take(
    path: Path, learner: StreamLearner, extra: dict[str, Any] | None, generation: int | None
) -> Snapshot:
    states = learner.states
    base = _base(path, learner)  # None: never written here, or someone else wrote since
    least = next_generation(path, learner)
    if generation is None:
        generation = least
    elif generation < least:  # a name of a committed file would be reused
        raise CheckpointError(f"generation {generation} at {path}: the next one is at least {least}")
    dirty, states.dirty = states.dirty, set()
    ids = states.stream_ids()
    files: dict[str, str] = {}
    names: dict[str, str] = {}
    resident: dict[int, str] = {}
    snap = Snapshot(path, {}, {}, None, names, learner=learner)
    for sid in ids:
        if base is not None and sid not in dirty and sid in base.files:
            files[sid] = base.files[sid]
            continue
        files[sid] = names[sid] = f"{_digest(sid)}-{generation}.pt"
        where = states.location(sid)
        if isinstance(where, int):
            resident[where] = sid
            continue
        target = path / STREAMS / names[sid]  # a spill file is never rewritten: link it
        target.unlink(missing_ok=True)
        try:
            os.link(where, target)
            snap.linked += 1
        except OSError:  # another file system, or none with hard links: read it now
            snap.loaded[sid] = torch.load(where, map_location="cpu", weights_only=True)
    snap.core = cloned(learner.state_dict(streams=False))
    snap.core["extra"] = cloned(extra or {})
    snap.manifest = {
        "format": FORMAT,
        "version": VERSION,
        "generation": generation,
        "learner": type(learner).__name__,
        "config": learner.cfg.to_dict(),
        "trunk_fingerprint": trunk_fingerprint(learner),
        "core": f"core-{generation}.pt",
        "streams": [[sid, files[sid]] for sid in ids],
    }
    if resident:
        snap.rows = RowSnapshot(states, resident)
    return snap


def _stamp_or_none(path: Path) -> tuple[int, int] | None:
    try:
        return stamp(path)
    except FileNotFoundError:
        return None


def _save(path: Path, obj: Any) -> int:
    # Serialised in memory first: torch.save into a file holds the GIL through each write, and a
    # write that waits for the disk (the page cache full of the checkpoint) then held the tick loop
    # for seconds; Python's own write and fsync let it run.
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return len(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_files(snap: Snapshot, stage: Callable[[str], None] | None = None, *, core: bool = True) -> int:
    """Write a snapshot's stream files and (``core``) its core file, durably; return the bytes.

    The first half of ``write_snapshot``; nothing is committed yet. ``stage`` is called with
    ``"rows"`` before the first stream file.
    """
    path, written = snap.path, 0
    try:
        if stage is not None:
            stage("rows")
        if snap.rows is not None:
            for slot, sid in snap.rows.streams.items():
                rows = {"id": sid, **snap.rows.take(slot)}
                written += _save(path / STREAMS / snap.names[sid], rows)
    finally:
        if snap.rows is not None:
            snap.rows.release()
    for sid, rows in snap.loaded.items():
        written += _save(path / STREAMS / snap.names[sid], rows)
    if core:
        written += _save(path / snap.manifest["core"], snap.core)
    _fsync_dir(path / STREAMS)
    return written


def commit_manifest(path: Path, manifest: dict[str, Any]) -> int:
    """The commit point: write the manifest (temporary file, fsync, rename, fsync of the folder);
    return its bytes. Every file it names must be durable already."""
    tmp = path / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path / MANIFEST)
    _fsync_dir(path)
    return size


def write_snapshot(snap: Snapshot, stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write a snapshot's files and commit its manifest; return sizes and timing.

    ``stage`` is called with ``"rows"`` before the first stream file and ``"commit"`` before the
    manifest (tests use it to hold or fail a write there). On any failure the previous checkpoint
    stays the committed one and the learner's next checkpoint writes every stream.
    """
    start = time.perf_counter()
    path, manifest = snap.path, snap.manifest
    learner = snap.learner
    assert learner is not None
    states = learner.states
    try:
        written = write_files(snap, stage)
        if stage is not None:
            stage("commit")
        written += commit_manifest(path, manifest)
        files = dict((sid, name) for sid, name in manifest["streams"])
        states.checkpoint_base = Committed(path.resolve(), manifest["generation"], files, stamp(path))
        total = remove_unnamed(path, manifest)
    except BaseException:
        states.checkpoint_base = None
        raise
    finally:
        states.writing = False
    seconds = time.perf_counter() - start
    log.info(
        "checkpoint %d written: %s (%d streams, %d written, %d updates, %.1f MB of %.1f MB, %.2f s)",
        manifest["generation"], path, len(files), len(snap.names), learner.updates_applied,
        written / 2**20, total / 2**20, seconds,
    )  # fmt: skip
    return {
        "generation": manifest["generation"],
        "streams_written": len(snap.names),
        "bytes_written": written,
        "bytes": total,
        "write_seconds": seconds,
    }


def remove_unnamed(path: Path, manifest: dict[str, Any]) -> int:
    """Delete what the committed ``manifest`` does not name (older generations, a crashed write's
    files); return the bytes of what it names."""
    core, streams = manifest["core"], {name for _, name in manifest["streams"]}
    total = (path / MANIFEST).stat().st_size
    for f in path.iterdir():
        if f.is_file() and f.name != MANIFEST:
            if f.name == core:
                total += f.stat().st_size
            else:
                f.unlink(missing_ok=True)
    for f in (path / STREAMS).iterdir():
        if f.name in streams:
            total += f.stat().st_size
        else:
            f.unlink(missing_ok=True)
    return total


def save_checkpoint(
    path: str | os.PathLike[str], learner: StreamLearner, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``learner`` (and ``extra``) to ``path`` now: ``take_snapshot`` then ``write_snapshot``."""
    return write_snapshot(take_snapshot(path, learner, extra))
