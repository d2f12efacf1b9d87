"""Dependencies of the routes: the settings, the broker, a validated stream id, and worker commands."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Path, Request

from service.broker import Broker
from service.config import STREAM_ID_PATTERN, Settings
from service.errors import error_from_payload
from service.messages import Control


# async: a plain def would be run in FastAPI's thread pool, one thread hop per request each
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_broker(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


SettingsDep = Annotated[Settings, Depends(get_settings)]
BrokerDep = Annotated[Broker, Depends(get_broker)]
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
