"""The worker's learner as the settings describe it: which learner, on which device, on how many CPU
threads, holding how many streams' state in memory.

Examples
--------
>>> learner = build_learner(Settings())  # doctest: +SKIP
>>> limit_memory(learner, Settings(), spill_folder(Settings()))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from learner.errors import ConfigError
from learner.streaming import StreamLearner, resolve_device
from service.config import Settings

logger = logging.getLogger(__name__)


def build_learner(settings: Settings) -> StreamLearner:
    """The learner the settings describe, on ``auto`` → CUDA when available, else the CPU."""
    cfg = settings.model_config_obj()
    device = resolve_device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("FOVEATE_DEVICE=cuda but torch sees no CUDA device; use auto or cpu")
    if settings.learner == "bptt":
        from learner.bptt import BPTTLearner

        return BPTTLearner(cfg, device=device, window=settings.bptt_window)
    from learner.rfp import RFPLearner

    return RFPLearner(cfg, device=device)


def torch_threads(settings: Settings) -> int:
    """The learner's CPU threads: ``torch_threads``, or when 0 every core this process may use but one.

    The one left over is for the API's event loop, the decode threads and Redis, whether they share
    this process (``serve``) or only the machine (a compose stack): on 2 cores torch's default of 2
    threads spun against them and made a 64-stream run 14 times slower (docs/deploy.md, Threads).
    """
    if settings.torch_threads:
        return settings.torch_threads
    try:
        cores = len(os.sched_getaffinity(0))  # what a container's cpuset allows, not the host's count
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, cores - 1)


def spill_folder(settings: Settings, rank: int | None = None) -> Path | None:
    """Where the streams beyond the memory cap wait: ``<checkpoint>.spill`` beside the checkpoint
    (none without one), and ``<checkpoint>.spill/rank-<r>`` for rank ``r`` of a distributed worker:
    each rank empties its folder at start, and must never empty, or write into, another rank's."""
    path = settings.checkpoint_path
    if path is None:
        return None
    folder = path.with_name(path.name + ".spill")
    return folder if rank is None else folder / f"rank-{rank}"


def limit_memory(learner: StreamLearner, settings: Settings, spill: Path | None = None) -> int:
    """Cap the streams' state at ``max_state_mb``; spill beyond it to ``spill`` (:func:`spill_folder`).

    Returns how many streams stay resident.
    """
    s = settings
    spill = spill if spill is not None and learner.can_spill else None
    streams = learner.limit_memory(s.max_state_mb * 2**20, spill)
    if spill is not None and streams < s.max_batch:
        raise ConfigError(
            f"FOVEATE_MAX_STATE_MB={s.max_state_mb} holds {streams} streams, fewer than one tick's "
            f"FOVEATE_MAX_BATCH={s.max_batch}: raise it"
        )
    logger.info("stream state: at most %d streams resident (%d MB)%s", streams, s.max_state_mb,
                "" if spill is None else f", the others spilled to {spill}")  # fmt: skip
    return streams
