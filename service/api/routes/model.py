"""``/v1/model``: the model's configuration and counters, and on-demand checkpoints."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.deps import BrokerDep, SettingsDep, ask_worker
from service.api.schemas import CheckpointOut, ErrorBody, ModelInfo

router = APIRouter(prefix="/model", tags=["model"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorBody, "description": "No live worker, or Redis unreachable"},
    504: {"model": ErrorBody, "description": "The worker did not answer in time"},
}


@router.get("", response_model=ModelInfo, responses=_ERRORS, summary="Model configuration and counters")
async def get_model(broker: BrokerDep) -> Any:
    """The ``ModelConfig``, parameter counts by part, updates applied, streams, and the last checkpoint."""
    return (await ask_worker(broker, "model"))["model"]


@router.post(
    "/checkpoint",
    response_model=CheckpointOut,
    responses={422: {"model": ErrorBody, "description": "Checkpoints are disabled"}, **_ERRORS},
    summary="Write a checkpoint now",
)
async def write_checkpoint(broker: BrokerDep, settings: SettingsDep) -> Any:
    # A big model's checkpoint can take longer than a fixation's timeout.
    reply = await ask_worker(broker, "checkpoint", timeout=max(settings.sync_timeout_s, 60.0))
    return reply["checkpoint"]
