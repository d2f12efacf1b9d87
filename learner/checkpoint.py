"""Checkpoints: weights, optimizer, ``ModelConfig`` and every stream's state in one file.

Written atomically (a temporary file in the same folder, fsync, rename, fsync of the folder), so a
crash leaves either the old checkpoint or the new one, never half of one. Read with
``torch.load(weights_only=True)``: plain containers and tensors only, no arbitrary unpickling.

The frozen trunk is not stored (it is rebuilt from the config); a fingerprint of its weights is, and
a checkpoint whose architecture or trunk differs from the configured model is refused with
``ArchitectureMismatch`` rather than silently re-initialised.

``extra`` carries the service's bookkeeping (per-stream sequence numbers, queue offsets) so that it
is saved atomically with the learner state it describes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from learner.config import ModelConfig
from learner.errors import ArchitectureMismatch, CheckpointError
from learner.streaming import StreamLearner

log = logging.getLogger(__name__)

FORMAT = "foveate-checkpoint"
VERSION = 3  # 2: the context-list embedding, whitened_mse, three optimizer groups; 3: rgc_inputs (issue 11)


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


def save_checkpoint(
    path: str | os.PathLike[str], learner: StreamLearner, extra: dict[str, Any] | None = None
) -> None:
    """Write ``learner`` (and ``extra``) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "learner": type(learner).__name__,
        "config": learner.cfg.to_dict(),
        "trunk_fingerprint": trunk_fingerprint(learner),
        "state": learner.state_dict(),
        "extra": extra or {},
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    log.info(
        "checkpoint written: %s (%d streams, %d updates)", path, len(learner.states), learner.updates_applied
    )


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a checkpoint file without applying it."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"{path} is not a readable foveate checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a foveate checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {payload.get('version')}, this foveate reads {VERSION}"
        )
    return payload


def load_checkpoint(path: str | os.PathLike[str], learner: StreamLearner) -> dict[str, Any]:
    """Restore ``learner`` from ``path``; return the checkpoint's ``extra``.

    Raises ``ArchitectureMismatch`` when the file was written by another architecture, another
    learner type, or another trunk; learning settings (lr, update mode, ...) follow the configured
    learner, not the file.
    """
    payload = read_checkpoint(path)
    saved = ModelConfig.from_dict(payload["config"])
    ours = learner.cfg
    diff = {
        k: (v, ours.architecture()[k]) for k, v in saved.architecture().items() if ours.architecture()[k] != v
    }
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs configured {b!r}" for k, (a, b) in diff.items())
        raise ArchitectureMismatch(f"{path} was written by another architecture ({detail})")
    if payload["learner"] != type(learner).__name__:
        raise ArchitectureMismatch(f"{path} holds a {payload['learner']}, not a {type(learner).__name__}")
    if payload["trunk_fingerprint"] != trunk_fingerprint(learner):
        raise ArchitectureMismatch(
            f"{path} was trained on other trunk weights than the configured ones "
            f"(trunk_weights={ours.trunk_weights!r}, seed={ours.seed})"
        )
    try:
        learner.load_state_dict(payload["state"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is malformed: {exc}") from exc
    # learning settings follow the configuration
    for group, lr in zip(learner.optimizer.param_groups, learner.group_lrs(), strict=True):
        group["lr"] = lr
        group["weight_decay"] = ours.weight_decay
    log.info(
        "checkpoint restored: %s (%d streams, %d updates)", path, len(learner.states), learner.updates_applied
    )
    return dict(payload["extra"])
