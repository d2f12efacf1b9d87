"""What the worker answers to each command (``Control``): one handler per name in ``messages.COMMANDS``.

A handler takes the worker and the command's ``args`` and returns the reply's fields (the worker
adds ``"ok": true``), or raises a ``FoveateError`` that the worker sends back as the reply's error.
:data:`HANDLERS` is the whole table; the worker runs a handler on its own thread, between ticks, with
its lock held, except those in :data:`TAKE_THEIR_OWN_LOCK`.

Examples
--------
>>> sorted(HANDLERS) == sorted(COMMANDS)
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from service import live, metrics
from service.errors import UnknownStream
from service.messages import COMMANDS, Command
from service.streams import StreamRecord

if TYPE_CHECKING:
    from service.worker import Worker

Handler = Callable[["Worker", dict[str, Any]], dict[str, Any]]

__all__ = ["COMMANDS", "HANDLERS", "TAKE_THEIR_OWN_LOCK", "Handler"]


def _record(worker: Worker, args: dict[str, Any]) -> StreamRecord:
    sid = str(args.get("stream_id", ""))
    rec = worker.records.get(sid)
    if rec is None:
        raise UnknownStream(f"no stream {sid[:140]!r}: it has received no fixation yet, or was deleted")
    return rec


def _ping(worker: Worker, args: dict[str, Any]) -> dict[str, Any]:
    return {}


def _streams(worker: Worker, args: dict[str, Any]) -> dict[str, Any]:
    prefix = str(args.get("prefix", ""))  # one namespace's streams (service/api/deps.py Principal)
    found = [r.summary() for r in worker.records.values() if r.stream_id.startswith(prefix)]
    return {"streams": found, "count": len(found)}


def _stream(worker: Worker, args: dict[str, Any]) -> dict[str, Any]:
    rec = _record(worker, args)
    return {"stream": {**rec.info(), "state": worker.learner.stream_info(rec.stream_id)}}


def _prediction(worker: Worker, args: dict[str, Any]) -> dict[str, Any]:
    rec = _record(worker, args)
    pred = worker.learner.prediction(rec.stream_id)
    return {"stream_id": rec.stream_id, "step": rec.step,
            "prediction": None if pred is None else pred.detach().cpu().tolist()}  # fmt: skip


def _reset(worker: Worker, args: dict[str, Any]) -> dict[str, Any]:
    """Start the stream afresh: its state, its step count and its seq numbering."""
    rec = _record(worker, args)
    worker.learner.reset(rec.stream_id)
    rec.resets += 1
    rec.step = 0
    rec.forget_seq()
    metrics.RESETS.inc()
    return {"stream_id": rec.stream_id, "step": 0}


def _delete(worker: Worker, args: dict[str, Any]) -> dict[str, Any]:
    """Forget the stream everywhere, remembering its last entry so that a replay cannot revive it."""
    rec = _record(worker, args)
    worker.learner.drop(rec.stream_id)
    del worker.records[rec.stream_id]
    worker.deleted.bury(rec.stream_id, rec.last_entry_id)
    worker.broker.forget_stream(rec.stream_id)
    live.FEED.forget(rec.stream_id)
    metrics.ACTIVE_STREAMS.set(len(worker.records))
    return {"stream_id": rec.stream_id, "deleted": True}


def _model(worker: Worker, args: dict[str, Any]) -> dict[str, Any]:
    return {"model": worker.model_info()}


def _checkpoint(worker: Worker, args: dict[str, Any]) -> dict[str, Any]:
    return {"checkpoint": worker.checkpoint()}


HANDLERS: dict[Command, Handler] = {
    "ping": _ping,
    "streams": _streams,
    "stream": _stream,
    "prediction": _prediction,
    "reset": _reset,
    "delete": _delete,
    "model": _model,
    "checkpoint": _checkpoint,
}

#: Commands whose handler takes the worker's lock itself, for only as long as it needs it.
TAKE_THEIR_OWN_LOCK: frozenset[Command] = frozenset({"checkpoint"})
