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


def test_a_worker_error_keeps_its_service_class_beside_the_sdk() -> None:
    """The SDK's errors derive from the same root and reuse names: a worker's UnknownStream must come
    back as the service's (404), not the SDK's (which has no status here: 500)."""
    import clients.sdk.errors as sdk_errors
    from service.errors import QueueFull, UnknownStream

    for klass in (UnknownStream, QueueFull, PatchError):
        assert hasattr(sdk_errors, klass.__name__)  # the names the SDK shares
        exc = error_from_payload(error_payload(klass("x")))
        assert type(exc) is klass
        assert status_of(type(exc))[0] < 500


def test_unknown_class_name_becomes_worker_error() -> None:
    exc = error_from_payload({"error": "ZeroDivisionError", "detail": "boom"})
    assert isinstance(exc, WorkerError) and "ZeroDivisionError" in str(exc)


def _retry_after_of(exc: FoveateError) -> str | None:
    """The Retry-After an exception's answer carries, through a real FastAPI app and its handlers."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise exc

    r = TestClient(app).get("/boom")
    assert r.status_code == status_of(type(exc))[0]
    return r.headers.get("retry-after")


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (TooManyStreams("full"), "1"),
        (QueueFull("full", retry_after=2.2), "3"),  # whole seconds, rounded up
        (QueueFull("full", retry_after=0.01), "1"),  # never 0: that invites a tight loop
        (WorkerUnavailable("no worker"), str(errors.UNAVAILABLE_RETRY_S)),
        (WorkerTimeout("late"), None),
        (InputError("bad"), None),
    ],
)
def test_back_pressure_answers_carry_retry_after(exc: FoveateError, retry: str | None) -> None:
    assert _retry_after_of(exc) == retry


def test_every_429_and_503_carries_retry_after() -> None:
    # Every class of the tree that answers 429 or 503, raised as the worker's payload rebuilds it
    # (without a retry_after of its own): each must still tell the client when to come back.
    classes = errors._all_classes().values()
    refusals = [k for k in classes if status_of(k)[0] in (429, 503)]
    assert {"QueueFull", "TooManyStreams", "RateLimited", "StateFull", "WorkerUnavailable"} <= {
        k.__name__ for k in refusals
    }
    for klass in refusals:
        seconds = _retry_after_of(klass("refused"))
        assert seconds is not None and int(seconds) >= 1, klass.__name__
