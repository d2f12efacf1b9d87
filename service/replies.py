"""What the worker's replies say about one fixation: its scores, or the error that stopped it.

A reply is a JSON-able dict (service/messages.py): ``{"ok": true, ...}`` with the fields of
:func:`fixation_scores`, or ``{"ok": false, "error": "<class>", "detail": "..."}`` from
:func:`failure`.
"""

from __future__ import annotations

import math
from typing import Any

from learner.errors import FoveateError
from service.errors import error_payload, status_of
from service.running_stats import skill


def fixation_scores(error: float, repeat_error: float, skipped: bool) -> dict[str, Any]:
    """The scores of one fixation in a reply: ``error``, ``repeat_error`` (the baseline that predicts
    the next embedding to be the current one), ``skill`` = 1 - error / repeat_error, and ``skipped``
    (scored but not learned from). NaN, and a skill without a positive repeat error, become None.

    >>> fixation_scores(0.25, 0.5, False)
    {'error': 0.25, 'repeat_error': 0.5, 'skill': 0.5, 'skipped': False}
    >>> fixation_scores(float("nan"), float("nan"), False)
    {'error': None, 'repeat_error': None, 'skill': None, 'skipped': False}
    """
    if math.isnan(error):
        return {"error": None, "repeat_error": None, "skill": None, "skipped": bool(skipped)}
    repeat = None if math.isnan(repeat_error) else repeat_error
    value = math.nan if repeat is None else skill(error, repeat)
    return {
        "error": error,
        "repeat_error": repeat,
        "skill": None if math.isnan(value) else value,
        "skipped": bool(skipped),
    }


def failure(exc: Exception) -> dict[str, Any]:
    """The reply to a message that failed: the error's class and detail; a bug is a ``WorkerError``."""
    if isinstance(exc, FoveateError):
        return {"ok": False, **error_payload(exc)}
    return {"ok": False, "error": "WorkerError", "detail": f"{type(exc).__name__}: {exc}"}


def reject_reason(exc: Exception) -> str:
    """The ``reason`` label of ``foveate_rejected_messages_total`` for an error."""
    return status_of(type(exc))[1] if isinstance(exc, FoveateError) else "internal"
