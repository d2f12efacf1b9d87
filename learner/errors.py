"""The learner's exceptions: the root of foveate's one exception hierarchy.

The whole tree, with the HTTP status the service maps each one to, is drawn in
``service/errors.py``; the client SDK's tree (``clients/sdk/errors.py``) hangs below ``FoveateError`` too,
its ``PatchError`` and the others of the same name deriving from these. This module imports only the
standard library, so the SDK can use it without PyTorch. The learner's part::

    FoveateError                      root; never raised itself
    ├── ConfigError                   a ModelConfig value is out of range          (422)
    ├── InputError                    bad fixation data                            (422)
    │   └── PatchError                undecodable image, wrong shape or channels, NaN
    ├── StateFull                     the stream-state memory cap is reached and no
    │                                 stream can be spilled                        (429)
    ├── TrunkWeightsError             a trunk weights file is missing, unreadable,
    │                                 or its keys do not match the architecture    (500 at start-up)
    ├── CheckpointError               a checkpoint is unreadable or malformed
    │   └── ArchitectureMismatch      the checkpoint was written by another architecture
    └── DistributedError              ranks that share one model disagree (out of lockstep,
        │                             different weights): a bug or a misconfiguration
        └── RankLost                  another rank stopped, or stalled past the timeout
"""

from __future__ import annotations


class FoveateError(Exception):
    """Root of every error foveate raises on purpose."""


class ConfigError(FoveateError, ValueError):
    """A configuration value is out of range or inconsistent."""


class InputError(FoveateError, ValueError):
    """Input data that cannot be learned from; the message says what to fix."""


class PatchError(InputError):
    """An image or patch that cannot be decoded, cut, or has the wrong shape."""


class StateFull(FoveateError):
    """No memory for another stream's state: the cap is reached and no idle stream can be spilled."""


class TrunkWeightsError(FoveateError):
    """Trunk weights that cannot be loaded: a bad path, or keys that do not match."""


class CheckpointError(FoveateError):
    """A checkpoint that cannot be read or written."""


class ArchitectureMismatch(CheckpointError):
    """A checkpoint written by a model of another architecture than the one configured."""


class DistributedError(FoveateError):
    """Ranks that share one model (``learner.distributed``) disagree about the tick or the model."""


class RankLost(DistributedError):
    """A collective failed: another rank exited, or stalled past the process group's timeout."""
