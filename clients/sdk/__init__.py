"""The Python SDK of the foveate API: sync and asyncio clients, typed results, typed errors.

::

    from clients.sdk import FoveateClient

    with FoveateClient("http://127.0.0.1:8000") as client:
        r = client.post_fixation("rig1", patch, seq=0, reset=True)   # patch: (H, W, 3) uint8 RGB
        r.step, r.error                                               # 1, None (nothing predicted yet)
        client.stream("rig1").running_error

===========================  =====================================================================
``clients/sdk/client.py``    :class:`FoveateClient` (``httpx.Client``)
``clients/sdk/aclient.py``   :class:`AsyncFoveateClient` (``httpx.AsyncClient``), same methods
``clients/sdk/models.py``    the results: :class:`FixationResult`, :class:`StreamInfo`, ...
``clients/sdk/errors.py``    the exception tree, mirroring the server's error classes
``clients/sdk/fixation.py``  :class:`FixationItem` and the encoding of numpy images
``clients/sdk/retry.py``     :class:`RetryPolicy`: what is retried, backoff, jitter, Retry-After
``clients/sdk/_core.py``     the API's requests and the parsing of their answers, for both clients
===========================  =====================================================================

The SDK needs httpx and numpy (and OpenCV to encode numpy patches), not PyTorch.
"""

from clients.sdk._core import API_KEY_ENV, DEFAULT_URL
from clients.sdk.aclient import AsyncFoveateClient
from clients.sdk.client import FoveateClient
from clients.sdk.errors import (
    APIError,
    ArchitectureMismatch,
    BodyTimeout,
    CheckpointError,
    ClientError,
    ConfigError,
    ConnectError,
    Forbidden,
    InputError,
    MalformedRequest,
    Overloaded,
    PatchError,
    PayloadTooLarge,
    ProtocolError,
    QueueFull,
    RateLimited,
    RequestRejected,
    RequestTimeout,
    ServerError,
    TooManyStreams,
    TransportError,
    TrunkWeightsError,
    Unauthorized,
    UnknownStream,
    UnsupportedMediaType,
    WorkerError,
    WorkerTimeout,
    WorkerUnavailable,
)
from clients.sdk.fixation import FixationItem, encode_image
from clients.sdk.models import (
    Accepted,
    BatchItem,
    CheckpointInfo,
    FixationResult,
    Health,
    ModelInfo,
    Prediction,
    Ready,
    ResetResult,
    StepError,
    StreamInfo,
    StreamSummary,
)
from clients.sdk.retry import NO_RETRY, RetryEvent, RetryPolicy

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_URL",
    "NO_RETRY",
    "APIError",
    "Accepted",
    "ArchitectureMismatch",
    "AsyncFoveateClient",
    "BatchItem",
    "BodyTimeout",
    "CheckpointError",
    "CheckpointInfo",
    "ClientError",
    "ConfigError",
    "ConnectError",
    "FixationItem",
    "FixationResult",
    "Forbidden",
    "FoveateClient",
    "Health",
    "InputError",
    "MalformedRequest",
    "ModelInfo",
    "Overloaded",
    "PatchError",
    "PayloadTooLarge",
    "Prediction",
    "ProtocolError",
    "QueueFull",
    "RateLimited",
    "Ready",
    "RequestRejected",
    "RequestTimeout",
    "ResetResult",
    "RetryEvent",
    "RetryPolicy",
    "ServerError",
    "StepError",
    "StreamInfo",
    "StreamSummary",
    "TooManyStreams",
    "TransportError",
    "TrunkWeightsError",
    "Unauthorized",
    "UnknownStream",
    "UnsupportedMediaType",
    "WorkerError",
    "WorkerTimeout",
    "WorkerUnavailable",
    "encode_image",
]
