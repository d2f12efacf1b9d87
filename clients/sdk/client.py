"""``FoveateClient``: the synchronous client of the foveate HTTP API (httpx).

Examples
--------
>>> import numpy as np
>>> from clients.sdk import FoveateClient
>>> with FoveateClient("http://127.0.0.1:8000") as client:            # doctest: +SKIP
...     patch = np.zeros((64, 64, 3), np.uint8)
...     first = client.post_fixation("rig1", patch, seq=0, reset=True)
...     first.step, first.error
(1, None)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, Unpack, overload

import httpx

from clients.sdk import _core, errors
from clients.sdk._core import Call, read_answer
from clients.sdk.fixation import Encoding, FixationFields, FixationItem, ImageLike
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
    StreamInfo,
    StreamSummary,
)
from clients.sdk.retry import NO_RETRY, RetryEvent, RetryPolicy, next_retry, transport_error

__all__ = ["FoveateClient"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class FoveateClient:
    """Synchronous client of the foveate API; one connection pool, safe to share between threads.

    Parameters
    ----------
    base_url : str, optional
        The server, e.g. ``http://127.0.0.1:8000``; default ``$FOVEATE_URL`` or that address.
    timeout : float or httpx.Timeout
        Seconds to wait for an answer (a fixation with ``wait=True`` waits for the worker's tick).
    retry : RetryPolicy, optional
        When to retry (429, 503 and connection failures, with exponential backoff and jitter,
        honouring ``Retry-After``); ``RetryPolicy(max_retries=0)`` never retries.
    encoding : {"png", "jpeg", "raw"}
        How numpy patches are sent: PNG (lossless, the default), JPEG (quality 95), or raw pixels.
    api_key : str, optional
        The API key, sent as ``Authorization: Bearer <key>``; default ``$FOVEATE_API_KEY``, and none
        when that is unset too (a server on 127.0.0.1 without keys). It is never logged or shown.
    headers : mapping, optional
        Extra headers for every request (a proxy's authorisation, say).
    transport : httpx.BaseTransport, optional
        For tests: ``httpx.MockTransport(handler)``, or ``httpx.HTTPTransport(retries=...)``.
    on_retry : callable, optional
        Called with a :class:`RetryEvent` before each wait (to log or count retries).

    Examples
    --------
    >>> client = FoveateClient("http://127.0.0.1:8000", retry=RetryPolicy(max_retries=2))
    >>> client.base_url
    'http://127.0.0.1:8000'
    >>> client.close()
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float | httpx.Timeout = 30.0,
        retry: RetryPolicy | None = None,
        encoding: Encoding = "png",
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
    ) -> None:
        self.base_url = (base_url or _core.default_base_url()).rstrip("/")
        self.retry = retry if retry is not None else RetryPolicy()
        self.encoding: Encoding = encoding
        self.on_retry = on_retry
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            headers=_core.auth_headers(api_key, headers),
            transport=transport,
        )

    # ------------------------------------------------------------ plumbing

    def _send(self, call: Call[T], *, retry: bool = True) -> T:
        policy = self.retry if retry else NO_RETRY
        request = self._http.build_request(call.method, call.path, json=call.json, params=call.params)
        attempt, waited = 0, 0.0
        while True:
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                event = next_retry(policy, request, attempt, exc=exc, safe_to_repeat=call.safe_to_repeat,
                                   waited=waited)  # fmt: skip
                if event is None:
                    raise transport_error(exc, request) from exc
            else:
                event = next_retry(policy, request, attempt, response=response, waited=waited)
                if event is None:
                    return read_answer(call, response)
                response.close()
            attempt += 1
            logger.info(
                "retry %d of %s %s in %.2f s: %s", attempt, event.method, event.url, event.delay, event.reason
            )
            if self.on_retry is not None:
                self.on_retry(event)
            waited += event.delay
            time.sleep(event.delay)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> FoveateClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FoveateClient({self.base_url!r})"

    # ------------------------------------------------------------ fixations

    @overload
    def post_fixation(
        self,
        stream_id: str,
        patch: ImageLike | None = None,
        *,
        wait: Literal[True] = True,
        return_prediction: bool = False,
        **fields: Unpack[FixationFields],
    ) -> FixationResult: ...

    @overload
    def post_fixation(
        self,
        stream_id: str,
        patch: ImageLike | None = None,
        *,
        wait: Literal[False],
        return_prediction: bool = False,
        **fields: Unpack[FixationFields],
    ) -> Accepted: ...

    def post_fixation(
        self,
        stream_id: str,
        patch: ImageLike | None = None,
        *,
        wait: bool = True,
        return_prediction: bool = False,
        **fields: Unpack[FixationFields],
    ) -> FixationResult | Accepted:
        """Send one fixation of a stream and (by default) wait for the worker's result.

        Parameters
        ----------
        stream_id : str
            The stream (one per participant or rig): 1-128 characters from ``A-Z a-z 0-9 _ . : -``.
        patch : ndarray or bytes, optional
            The fixated patch: RGB uint8 (H, W, 3) or grey (H, W), encoded as ``encoding`` says;
            or PNG/JPEG file bytes. Leave out when sending ``frame``.
        wait : bool
            True: return the :class:`FixationResult`. False: return :class:`Accepted` as soon as
            the fixation is queued (the result is then only visible through the stream's state).
        return_prediction : bool
            Include the predicted next embedding in the result.
        **fields
            ``frame`` (array or PNG/JPEG bytes) with ``x``, ``y`` (frame pixels, origin top-left)
            and ``size_px`` or ``size_deg`` + ``px_per_deg``: the server cuts the patch;
            ``seq`` (your sequence number), ``t`` (onset, seconds), ``duration_ms``,
            ``reset`` (start a new sequence, e.g. a new image), ``encoding`` (this call's).

        Raises
        ------
        InputError, PatchError
            Bad fields or image (the message says what to fix); raised before sending when the
            client can tell.
        Overloaded, WorkerUnavailable
            Still refused after the retries.
        WorkerTimeout
            No result in time; the fixation may still be applied.
        """
        call = _core.fixation_call(stream_id, patch, fields, wait=wait, return_prediction=return_prediction,
                                   encoding=self.encoding)  # fmt: skip
        result: FixationResult | Accepted = self._send(call)
        return result

    def post_fixations(
        self,
        items: Sequence[FixationItem | Mapping[str, Any]],
        *,
        wait: bool = True,
        return_prediction: bool = False,
    ) -> list[BatchItem]:
        """Send many fixations (of one or several streams) in one request.

        Each stream's fixations are applied in list order. An item whose image the server cannot
        decode is rejected alone: its :class:`BatchItem` has ``ok=False`` and ``error`` set (not
        raised; ``item.unwrap()`` raises it); the others are still applied.

        Parameters
        ----------
        items : sequence of FixationItem or dict
            The fixations; dicts take :class:`FixationItem`'s fields (``stream_id``, ``patch``, ...).
        wait, return_prediction
            As in :meth:`post_fixation`.
        """
        return self._send(_core.batch_call(items, wait=wait, return_prediction=return_prediction,
                                           encoding=self.encoding))  # fmt: skip

    # ------------------------------------------------------------ streams

    def streams(self) -> list[StreamSummary]:
        """Every stream the worker holds."""
        return self._send(_core.streams_call())

    def stream(self, stream_id: str) -> StreamInfo:
        """One stream's state: step, fixations, errors, timestamps (``UnknownStream`` if none)."""
        return self._send(_core.stream_call(stream_id))

    def prediction(self, stream_id: str) -> Prediction:
        """The stream's predicted next embedding (``prediction`` is None before its first fixation)."""
        return self._send(_core.prediction_call(stream_id))

    def reset(self, stream_id: str) -> ResetResult:
        """Start a new sequence: the stream's next fixation is step 1 and is not scored."""
        return self._send(_core.reset_call(stream_id))

    def delete(self, stream_id: str) -> bool:
        """Forget the stream and its state; True when it was deleted."""
        return self._send(_core.delete_call(stream_id))

    # ------------------------------------------------------------ model and operations

    def model(self) -> ModelInfo:
        """The model's configuration, parameter counts and counters."""
        return self._send(_core.model_call())

    def checkpoint(self) -> CheckpointInfo:
        """Ask the worker to write a checkpoint now (``ConfigError`` when checkpoints are disabled)."""
        return self._send(_core.checkpoint_call())

    def health(self) -> Health:
        """``/healthz``: the API process answers."""
        return self._send(_core.health_call())

    def ready(self) -> Ready:
        """``/readyz``: a worker is alive; ``WorkerUnavailable`` (after the retries) if not."""
        return self._send(_core.ready_call())

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.1) -> Ready:
        """Poll :meth:`ready` until the server is up and a worker alive, for at most ``timeout`` seconds.

        Raises the last error (``ConnectError``, ``WorkerUnavailable``) when the time is up.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._send(_core.ready_call(), retry=False)
            except (errors.TransportError, errors.WorkerUnavailable):
                if time.monotonic() >= deadline:
                    raise
            time.sleep(interval)
