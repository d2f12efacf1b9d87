"""A lean request handler for hot routes: FastAPI's declaration, without FastAPI's per-request work.

FastAPI's generic handler resolves the dependencies, validates every path and query parameter with
pydantic and only then calls the endpoint: on ``POST /v1/streams/{stream_id}/fixations`` that costs
about as much CPU as the rest of the request together, on the event loop that also answers every
other stream. A route made by :func:`lean_route` stays an ordinary ``APIRoute`` (its OpenAPI
operation, its ``scope["route"]`` for the metrics' route label, its error handlers and body limit are
FastAPI's), but each request first goes to a *lean* coroutine that reads what it needs straight from
the request. The lean coroutine answers the plain requests a client sends every few milliseconds;
for anything unusual it returns :data:`NOT_LEAN` and the request goes to FastAPI's own handler,
so that every odd or invalid input gets exactly the answer it had before.

A lean coroutine returns a ``Response`` as is, or a value that the route validates against its
``response_model`` and serialises just as FastAPI does (same model, same options, same bytes).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar

from fastapi.exceptions import ResponseValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

#: What a lean coroutine returns to hand the request to FastAPI's full handler.
NOT_LEAN: Any = object()

Lean = Callable[[Request], Awaitable[Any]]


class LeanRoute(APIRoute):
    """An ``APIRoute`` that serves requests through :attr:`lean` first (see the module docstring).

    Subclasses set :attr:`lean`; :func:`lean_route` makes one for a coroutine.
    """

    lean: ClassVar[Lean]

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        full = super().get_route_handler()
        lean = type(self).lean
        field = self.response_field
        status = self.status_code or 200
        if field is not None and not hasattr(field, "serialize_json"):
            # a FastAPI without the serialisation this copies (before 0.130): FastAPI answers everything
            return full

        async def handler(request: Request) -> Response:
            out = await lean(request)
            if out is NOT_LEAN:
                return await full(request)
            if isinstance(out, Response):
                return out
            if field is None:
                raise TypeError("a lean route without a response_model must return a Response")
            # What FastAPI does with an endpoint's return value (fastapi.routing.serialize_response).
            value, errors = field.validate(out, {}, loc=("response",))
            if errors:
                raise ResponseValidationError(errors=errors, body=out)
            content = field.serialize_json(
                value,
                include=self.response_model_include,
                exclude=self.response_model_exclude,
                by_alias=self.response_model_by_alias,
                exclude_unset=self.response_model_exclude_unset,
                exclude_defaults=self.response_model_exclude_defaults,
                exclude_none=self.response_model_exclude_none,
            )
            return Response(content, status, media_type="application/json")

        return handler


def lean_route(lean: Lean) -> type[APIRoute]:
    """A route class (``route_class_override=``) whose requests go to ``lean`` first.

    Parameters
    ----------
    lean
        ``async (request) -> Response | model | NOT_LEAN``; it sees ``request.scope["path_params"]``
        already matched, and must return :data:`NOT_LEAN` before reading the body when FastAPI should
        answer instead.

    Examples
    --------
    >>> async def fast(request): return NOT_LEAN
    >>> issubclass(lean_route(fast), APIRoute)
    True
    """
    return type(
        f"LeanRoute_{getattr(lean, '__name__', 'handler')}", (LeanRoute,), {"lean": staticmethod(lean)}
    )
