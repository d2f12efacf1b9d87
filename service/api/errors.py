"""The exception handlers: every error the API answers, as ``{"error", "detail"}`` with its status.

The classes and their statuses are in service/errors.py (which the worker and the brokers import
without FastAPI); this module is the web side of that table, installed on the app by
:func:`install_error_handlers`.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service import metrics
from service.errors import FoveateError, error_headers, status_of

logger = logging.getLogger(__name__)


def _respond(
    status: int, reason: str, name: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    metrics.REJECTED_REQUESTS.labels(reason=reason).inc()
    return JSONResponse({"error": name, "detail": detail}, status_code=status, headers=headers)


def error_response(exc: FoveateError) -> JSONResponse:
    """The JSON answer for an exception, counted in ``foveate_rejected_requests_total``."""
    status, reason = status_of(type(exc))
    return _respond(status, reason, type(exc).__name__, str(exc), error_headers(exc))


async def _foveate_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FoveateError)
    status, _ = status_of(type(exc))
    if status >= 500:
        logger.error("%s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
    return error_response(exc)


async def _disconnect_handler(request: Request, exc: Exception) -> Response:
    # The client went away while its body was read: nobody is left to answer, and nothing failed
    # here. 499 (nginx's "client closed request") keeps it apart from server errors in the metrics.
    logger.debug("client disconnected during %s %s", request.method, request.url.path)
    return Response(status_code=499)


def _describe_validation(errors: list[Any]) -> tuple[bool, str]:
    """(is_malformed_json, "loc: message; …") for a list of pydantic error dicts."""
    parts: list[str] = []
    for err in errors[:10]:
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            return (
                True,
                f"request body is not valid JSON ({ctx.get('error', err.get('msg'))}); send a JSON object",
            )
        loc = ".".join(str(part) for part in err.get("loc", ()) if part != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    if len(errors) > 10:
        parts.append(f"... and {len(errors) - 10} more")
    return False, "; ".join(parts)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    malformed, detail = _describe_validation(list(exc.errors()))
    if malformed:
        return _respond(400, "malformed", "MalformedRequest", detail)
    return _respond(422, "bad_input", "InputError", detail)


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    phrase = HTTPStatus(exc.status_code).phrase.title().replace(" ", "").replace("-", "")
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404:
        detail = f"no route {request.method} {request.url.path}; see /docs for the API"
    reason = {404: "no_route", 405: "no_route"}.get(exc.status_code, "bad_input")
    return _respond(exc.status_code, reason, phrase, detail)


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not bad input: keep the body's shape, and let the log carry the traceback.
    logger.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
    return _respond(500, "internal", "InternalError", "unexpected server error; see the server log")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the ``{"error", "detail"}`` shape."""
    app.add_exception_handler(Exception, _unexpected_handler)
    app.add_exception_handler(FoveateError, _foveate_handler)
    app.add_exception_handler(ClientDisconnect, _disconnect_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
