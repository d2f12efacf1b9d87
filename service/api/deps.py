"""Dependencies of the routes: the settings, the broker, the caller's key, a validated stream id, and
worker commands.

Authentication (service/auth.py): :func:`authorize` finds the caller's :class:`Principal` from
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, checks the route's scope and the key's
request rate. Without any configured key (the loopback default) every caller is :data:`ANONYMOUS`,
which may do everything in the one unnamed namespace. A principal qualifies the stream ids a client
names with its namespace (``rig1`` -> ``lab-a:rig1``) and turns the worker's ids back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.auth import SCOPES, KeyStore
from service.broker import Broker
from service.config import STREAM_ID_PATTERN, Settings
from service.errors import Forbidden, Unauthorized, error_from_payload
from service.messages import Control


# async: a plain def would be run in FastAPI's thread pool, one thread hop per request each
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_broker(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id (``None`` without keys), its namespace and scopes."""

    key_id: str | None
    namespace: str | None
    scopes: frozenset[str]

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    @property
    def prefix(self) -> str:
        """What the worker's ids of this namespace start with (empty without a namespace)."""
        return f"{self.namespace}:" if self.namespace else ""

    def qualify(self, stream_id: str) -> str:
        """The worker's id of a stream this caller names."""
        return self.prefix + stream_id

    def local(self, qualified: str) -> str:
        """The id this caller knows a worker's stream by."""
        return qualified[len(self.prefix) :] if qualified.startswith(self.prefix) else qualified


ANONYMOUS = Principal(None, None, frozenset(SCOPES))

_AUTH_HELP = (
    "send it as 'Authorization: Bearer <key>' (or 'X-API-Key: <key>'); an administrator makes keys with "
    "`foveate keys create`"
)


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    api_key = request.headers.get("x-api-key")
    return api_key.strip() if api_key and api_key.strip() else None


def authorize(request: Request, scope: str) -> Principal:
    """The caller's principal if its key has ``scope`` (and it is within its rate); else raise.

    ``Unauthorized`` (401): no key or an unknown one; ``Forbidden`` (403): the key lacks the scope;
    ``RateLimited`` (429): over ``rate_limit_per_s``. The key itself never appears in a message.
    """
    state = request.app.state
    store: KeyStore | None = state.keys
    if store is None:
        principal = ANONYMOUS
    else:
        token = _token(request)
        if token is None:
            raise Unauthorized(f"this server needs an API key: {_AUTH_HELP}")
        key = store.lookup(token)
        if key is None:
            raise Unauthorized(f"the API key is not valid (unknown, revoked or mistyped); {_AUTH_HELP}")
        if not key.allows(scope):
            raise Forbidden(
                f"key {key.id} (scopes {', '.join(sorted(key.scopes))}) lacks the {scope!r} scope that "
                f"{request.method} {request.url.path} needs; use a key "
                f"with {scope!r}"
            )
        principal = Principal(key.id, key.namespace, key.scopes)
    state.rate_limiter.check(principal.key_id or "anonymous", f"key {principal.key_id or '(none)'}")
    return principal


# Declared for the OpenAPI document (the "Authorize" button of /docs); authorize() reads the headers.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer fov_...`")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same key in `X-API-Key`")


def _requires(scope: str) -> Any:
    async def dependency(
        request: Request,
        _bearer_key: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
        _header_key: Annotated[str | None, Security(_api_key)],
    ) -> Principal:
        return authorize(request, scope)

    dependency.__name__ = f"requires_{scope}"
    return dependency


SettingsDep = Annotated[Settings, Depends(get_settings)]
BrokerDep = Annotated[Broker, Depends(get_broker)]
IngestKey = Annotated[Principal, Depends(_requires("ingest"))]
ReadKey = Annotated[Principal, Depends(_requires("read"))]
AdminKey = Annotated[Principal, Depends(_requires("admin"))]
StreamId = Annotated[
    str,
    Path(
        pattern=STREAM_ID_PATTERN,
        description="1-128 characters from A-Z a-z 0-9 _ . : -",
        examples=["rig1-p07"],
    ),
]


async def ask_worker(
    broker: Broker, command: str, timeout: float | None = None, **args: Any
) -> dict[str, Any]:
    """Send a command to the worker and return its reply; the worker's error is raised here.

    Commands travel through the broker (the worker owns every stream's state; the API keeps none).
    """
    payload = await broker.command(Control(command, args), timeout)
    if not payload.get("ok"):
        raise error_from_payload(payload)
    return payload
