"""foveate's learner: R-JEPA whose recurrent area is trained by exact Recurrent Forward Propagation.

Pure PyTorch; no web imports. Start with ``RFPLearner`` (rfp.py) and ``ModelConfig`` (config.py).
The names below are imported lazily, so ``learner.errors`` and ``learner.patches`` stay light
(no torch) for clients that run next to an eye tracker.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from learner.bptt import BPTTLearner
    from learner.config import ModelConfig
    from learner.rfp import RFPLearner
    from learner.streaming import StreamLearner, TickOutput

_LAZY = {
    "BPTTLearner": "learner.bptt",
    "ModelConfig": "learner.config",
    "RFPLearner": "learner.rfp",
    "StreamLearner": "learner.streaming",
    "TickOutput": "learner.streaming",
}

__all__ = ["BPTTLearner", "ModelConfig", "RFPLearner", "StreamLearner", "TickOutput"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'learner' has no attribute {name!r}")
