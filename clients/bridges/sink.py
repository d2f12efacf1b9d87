"""Where a bridge's fixations go: the :class:`Sink` protocol, what it carries, and :class:`SdkSink`.

A sink delivers one fixation and sorts every failure into two kinds, which is all the
:class:`~clients.bridges.common.FixationPoster` needs to know: :class:`SinkUnavailable` (it may pass:
keep the fixation and retry) and :class:`SinkRejected` (this fixation is bad: count it and move on).
:class:`SdkSink` is the sink that posts through the SDK; tests use sinks that record instead.
``clients.bridges.common`` re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from learner.errors import FoveateError

if TYPE_CHECKING:
    import httpx

__all__ = [
    "OutgoingFixation",
    "PostResult",
    "PosterClosed",
    "SdkSink",
    "Sink",
    "SinkError",
    "SinkRejected",
    "SinkUnavailable",
]


class SinkError(FoveateError):
    """A fixation could not be delivered."""


class SinkUnavailable(SinkError):
    """The server cannot take the fixation now; it stays at the head of the backlog and is retried.

    ``retry_limit`` bounds the attempts for failures that may also be permanent (an unexpected 5xx):
    after that many the fixation is counted as rejected. None retries for as long as the run lasts.
    """

    def __init__(self, message: str, *, retry_limit: int | None = None) -> None:
        super().__init__(message)
        self.retry_limit = retry_limit


class SinkRejected(SinkError):
    """The server (or the SDK, before sending) refused this fixation for good: bad image, bad fields.

    It is skipped. ``__cause__`` is the SDK's error, e.g. a ``PatchError`` (which is also a
    ``learner.errors.PatchError``: one family on both sides).
    """


class PosterClosed(SinkError, RuntimeError):
    """A fixation was submitted after :meth:`FixationPoster.close`: a bug in the bridge's shutdown order."""


@dataclass(frozen=True)
class OutgoingFixation:
    """One fixation ready to post: its place in the stream, when, where and what was seen.

    ``t`` is the onset on the source's clock (seconds), ``x``, ``y`` the gaze point on the frame
    (pixels, origin top-left), ``patch`` the RGB uint8 patch cut there.
    """

    seq: int
    t: float
    duration_ms: float
    x: float
    y: float
    patch: np.ndarray = field(repr=False, compare=False)
    reset: bool = False


@dataclass(frozen=True)
class PostResult:
    """What the server answered: the stream's step and this fixation's prediction error."""

    step: int | None  # None: the server had applied this seq long before (a late retry)
    error: float | None


class Sink(Protocol):
    """Delivers one fixation of a stream; raises :class:`SinkUnavailable` or :class:`SinkRejected`."""

    def __call__(self, stream_id: str, fix: OutgoingFixation) -> PostResult: ...


class SdkSink:
    """A :class:`Sink` posting through the SDK's :class:`~clients.sdk.FoveateClient`.

    The client does not retry (``NO_RETRY``): the poster owns the backoff, so a stop request is
    never stuck behind the client's own sleeps.

    Parameters
    ----------
    base_url
        The server, e.g. ``http://127.0.0.1:8000``.
    timeout_s
        How long to wait for one answer (the server waits for its worker's tick).
    transport
        An httpx transport for the client (tests pass ``httpx.MockTransport``).
    api_key
        The server's API key; default ``$FOVEATE_API_KEY`` (none for a server without keys).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        from clients.sdk import NO_RETRY, FoveateClient

        self.base_url = base_url
        self._client = FoveateClient(
            base_url, timeout=timeout_s, retry=NO_RETRY, transport=transport, api_key=api_key
        )

    def __call__(self, stream_id: str, fix: OutgoingFixation) -> PostResult:
        from clients.sdk import errors as sdk

        try:
            result = self._client.post_fixation(
                stream_id, fix.patch, seq=fix.seq, t=fix.t, duration_ms=fix.duration_ms, reset=fix.reset
            )
        except (sdk.TransportError, sdk.Overloaded, sdk.WorkerUnavailable, sdk.WorkerTimeout) as exc:
            raise SinkUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except (sdk.Unauthorized, sdk.Forbidden) as exc:
            # The key is wrong for every fixation alike: keep them (bounded) until a good key is set.
            raise SinkUnavailable(f"{type(exc).__name__}: {exc}; check --api-key / FOVEATE_API_KEY") from exc
        except (sdk.ServerError, sdk.ProtocolError) as exc:
            # A 500 or a proxy's error page: often a restart in progress, sometimes a bug this
            # fixation triggers every time; a few attempts tell which.
            raise SinkUnavailable(f"{type(exc).__name__}: {exc}", retry_limit=3) from exc
        except sdk.RequestRejected as exc:
            raise SinkRejected(f"{type(exc).__name__}: {exc}") from exc
        return PostResult(step=result.step, error=result.error)

    def close(self) -> None:
        """Close the client's connection pool."""
        self._client.close()
