"""foveate: an online streaming learner for eye-tracking research.

This package holds only the ``foveate`` command line (``foveate/cli.py``). The work is done by
the sibling packages: ``learner`` (pure PyTorch), ``service`` (HTTP API, Redis worker, metrics)
and ``clients`` (SDK, replay, tracker bridges); see ``docs/design.md``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
