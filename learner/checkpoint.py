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
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from learner.config import ModelConfig
from learner.errors import ArchitectureMismatch, CheckpointError
from learner.snapshot import RowSnapshot, cloned
from learner.streaming import StreamLearner

log = logging.getLogger(__name__)

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


def has_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a committed checkpoint (or an old single file, which loading refuses)."""
    path = Path(path)
    return path.is_file() or (path / MANIFEST).is_file()


def _digest(stream_id: str) -> str:
    return hashlib.sha256(stream_id.encode()).hexdigest()[:32]


def _stamp(path: Path) -> tuple[int, int]:
    st = (path / MANIFEST).stat()
    return st.st_ino, st.st_mtime_ns


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


def _refuse_old_file(path: Path) -> None:
    if path.is_file():
        raise CheckpointError(
            f"{path} is a single-file checkpoint of an older foveate (format version 3 or before); this "
            f"foveate keeps a checkpoint folder there (version {VERSION}). Move the file away (learning "
            "then starts afresh) or point FOVEATE_CHECKPOINT_PATH elsewhere"
        )


def take_snapshot(
    path: str | os.PathLike[str], learner: StreamLearner, extra: dict[str, Any] | None = None
) -> Snapshot:
    """The in-memory half of a checkpoint: fast, and what the caller must hold the learner still for.

    After it the learner may tick on (in another thread than ``write_snapshot``'s, or not): the
    snapshot keeps the state of this instant. At most one snapshot per learner is in flight.
    """
    path = Path(path)
    _refuse_old_file(path)
    states = learner.states
    if states.writing:
        raise CheckpointError("a checkpoint of this learner is still being written")
    (path / STREAMS).mkdir(parents=True, exist_ok=True)
    try:
        snap = _take(path, learner, extra)
    except BaseException:
        states.checkpoint_base = None  # the changed streams were forgotten: the next write has them all
        raise
    states.writing = True
    return snap


def _take(path: Path, learner: StreamLearner, extra: dict[str, Any] | None) -> Snapshot:
    states = learner.states
    base = states.checkpoint_base
    if not isinstance(base, Committed) or base.path != path.resolve() or _stamp_or_none(path) != base.stamp:
        base = None  # never written here, or someone else wrote since: every stream is written
    generation = (_generation_on_disk(path) if base is None else base.generation) + 1
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
        return _stamp(path)
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
        written = 0
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
        written += _save(path / manifest["core"], snap.core)
        _fsync_dir(path / STREAMS)
        if stage is not None:
            stage("commit")
        tmp = path / f".{MANIFEST}.tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
            written += f.tell()
        os.replace(tmp, path / MANIFEST)
        _fsync_dir(path)
        files = dict((sid, name) for sid, name in manifest["streams"])
        states.checkpoint_base = Committed(path.resolve(), manifest["generation"], files, _stamp(path))
        total = _remove_unnamed(path, manifest["core"], set(files.values()))
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


def _remove_unnamed(path: Path, core: str, streams: set[str]) -> int:
    """Delete what no manifest names (older generations, a crashed write's files); return the bytes
    of what the manifest names."""
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


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a checkpoint's manifest without applying it."""
    path = Path(path)
    _refuse_old_file(path)
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


def load_checkpoint(path: str | os.PathLike[str], learner: StreamLearner) -> dict[str, Any]:
    """Restore ``learner`` from ``path``; return the checkpoint's ``extra``.

    Raises ``ArchitectureMismatch`` when the checkpoint was written by another architecture, another
    learner type, or another trunk; learning settings (lr, update mode, ...) follow the configured
    learner, not the checkpoint.
    """
    path = Path(path)
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
    try:
        learner.load_state_dict({**core, "streams": _stream_rows(path, manifest["streams"])})
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is malformed: {exc}") from exc
    # learning settings follow the configuration
    for group, lr in zip(learner.optimizer.param_groups, learner.group_lrs(), strict=True):
        group["lr"] = lr
        group["weight_decay"] = ours.weight_decay
    states = learner.states
    states.dirty.clear()  # every stream is as its file holds it
    files = {sid: name for sid, name in manifest["streams"]}
    states.checkpoint_base = Committed(path.resolve(), manifest["generation"], files, _stamp(path))
    log.info(
        "checkpoint restored: %s (%d streams, %d updates)", path, len(learner.states), learner.updates_applied
    )
    return dict(extra)
