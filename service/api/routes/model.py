"""``/v1/model``: the model's configuration and counters (``read``), and checkpoints (``admin``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.deps import AdminKey, BrokerDep, ReadKey, SettingsDep, ask_worker
from service.api.schemas import CheckpointOut, CommandIn, ErrorBody, ModelInfo

router = APIRouter(prefix="/model", tags=["model"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No API key, or an unknown one"},
    403: {"model": ErrorBody, "description": "The key lacks the route's scope"},
    429: {"model": ErrorBody, "description": "The key's request rate is exceeded; see Retry-After"},
    503: {"model": ErrorBody, "description": "No live worker, or Redis unreachable"},
    504: {"model": ErrorBody, "description": "The worker did not answer in time"},
}


@router.get("", response_model=ModelInfo, responses=_ERRORS, summary="Model configuration and counters")
async def get_model(broker: BrokerDep, key: ReadKey) -> Any:
    """The ``ModelConfig``, parameter counts by part, updates applied, streams, and the last checkpoint."""
    return (await ask_worker(broker, "model"))["model"]


@router.post(
    "/checkpoint",
    response_model=CheckpointOut,
    responses={422: {"model": ErrorBody, "description": "Checkpoints are disabled"}, **_ERRORS},
    summary="Write a checkpoint now (admin)",
)
async def write_checkpoint(body: CommandIn, broker: BrokerDep, settings: SettingsDep, key: AdminKey) -> Any:
    """Needs an ``admin`` key; the body is the JSON object ``{}``."""
    # A big model's checkpoint can take longer than a fixation's timeout.
    reply = await ask_worker(broker, "checkpoint", timeout=max(settings.sync_timeout_s, 60.0))
    return reply["checkpoint"]
