"""The exception hierarchy: one tree, one status per class, and the worker's errors round-trip."""

from __future__ import annotations

import pytest

from service import errors
from service.api.errors import install_error_handlers
from service.errors import (
    ArchitectureMismatch,
    FoveateError,
    InputError,
    MalformedRequest,
    PatchError,
    PayloadTooLarge,
    QueueFull,
    TooManyStreams,
    UnknownStream,
    WorkerError,
    WorkerTimeout,
    WorkerUnavailable,
    error_from_payload,
    error_payload,
    status_of,
)
from service.metrics import REJECT_REASONS


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (InputError, 422),
        (PatchError, 422),
        (MalformedRequest, 400),
        (PayloadTooLarge, 413),
        (UnknownStream, 404),
        (QueueFull, 429),
        (TooManyStreams, 429),
        (WorkerUnavailable, 503),
        (WorkerTimeout, 504),
        (WorkerError, 500),
        (ArchitectureMismatch, 500),
    ],
)
def test_each_class_has_its_status(exc: type[FoveateError], status: int) -> None:
    code, reason = status_of(exc)
    assert code == status
    assert reason in REJECT_REASONS


def test_every_class_is_drawn_in_the_tree() -> None:
    doc = errors.__doc__ or ""
    pending: list[type[FoveateError]] = [FoveateError]
    while pending:
        klass = pending.pop()
        pending.extend(klass.__subclasses__())
        if klass.__module__.startswith(("service", "learner")):
            assert f" {klass.__name__} " in doc, (
                f"{klass.__name__} missing from the tree in service/errors.py"
            )


def test_payload_round_trip_keeps_the_class_and_message() -> None:
    exc = error_from_payload(error_payload(PatchError("send PNG")))
    assert type(exc) is PatchError and str(exc) == "send PNG"


def test_unknown_class_name_becomes_worker_error() -> None:
    exc = error_from_payload({"error": "ZeroDivisionError", "detail": "boom"})
    assert isinstance(exc, WorkerError) and "ZeroDivisionError" in str(exc)


@pytest.mark.parametrize(
    ("exc", "retry"), [(TooManyStreams, "1"), (WorkerUnavailable, None), (InputError, None)]
)
def test_back_pressure_answers_carry_retry_after(exc: type[FoveateError], retry: str | None) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise exc("try later")

    r = TestClient(app).get("/boom")
    assert r.status_code == status_of(exc)[0]
    assert r.headers.get("retry-after") == retry
