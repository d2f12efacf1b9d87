"""The queue between the API and the worker: one interface, an in-process and a Redis implementation.

The API side is ``async`` (it runs in uvicorn's event loop); the worker side blocks (it runs in the
worker's threads). Both sides speak :class:`~service.messages.Fixation` and
:class:`~service.messages.Control` and receive replies as dicts::

    API                                   broker                         worker
    submit([Fixation], wait=...)  ──►  queue / XADD foveate:fixations ──►  get(timeout)
    command(Control)              ──►  queue / XADD foveate:control   ──►  get(timeout)
    result(request_id, timeout)   ◄──  future  / BLPOP result key     ◄──  reply([(msg, payload)])
    worker_alive()                ◄──  thread  / heartbeat key        ◄──  heartbeat(info)

:class:`LocalBroker` is the embedded default (``foveate serve``: one process, a bounded
:class:`Inbox`, replies handed to asyncio futures). :class:`~service.redis_broker.RedisBroker`
carries the same traffic over Redis Streams so that the API and the worker can be separate
processes; docs/redis-format.md specifies its messages.

Commands never queue behind fixations: both brokers hand the worker its messages through an
:class:`Inbox`, where a command overtakes every fixation still waiting, and the worker answers
waiting commands between any two ticks (a reset, a GET or ``/v1/model`` waits for at most one tick,
not for a backlog of thousands). The price: a command overtakes fixations sent before it that
are still queued; to reset a stream exactly between two fixations, send ``reset=true`` with the
second one.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from learner.errors import FoveateError
from service.backpressure import queue_full_retry_after, refuse_late
from service.config import Settings
from service.errors import QueueFull, WorkerTimeout, WorkerUnavailable
from service.messages import Control, Fixation

#: What the worker receives.
Message = Fixation | Control
#: A decoder the worker hands to the broker: fills ``fix.patch`` from ``fix.source`` or sets ``fix.problem``.
Decoder = Callable[[Fixation], None]


def new_request_id() -> str:
    """A fresh request id (32 hex characters)."""
    return uuid.uuid4().hex


class Inbox:
    """The worker's side of a broker: commands first, then fixations in arrival order.

    Fixations are bounded (``capacity``: a full inbox refuses or blocks the producer); commands have
    a bound of their own, so that a flood of fixations can never keep a command out.

    Examples
    --------
    >>> box = Inbox(capacity=2)
    >>> box.put_fixation(Fixation("a")), box.put_command(Control("ping", {}))
    (True, True)
    >>> type(box.get(0)).__name__, box.fixations()
    ('Control', 1)
    """

    def __init__(self, capacity: int, command_capacity: int = 1024) -> None:
        self.capacity, self.command_capacity = capacity, command_capacity
        self._fixations: deque[Fixation] = deque()
        self._commands: deque[Control] = deque()
        self._ready = threading.Condition()

    def put_fixation(self, fix: Fixation, timeout: float = 0.0) -> bool:
        """Queue a fixation, waiting up to ``timeout`` s for room; False when there was none."""
        with self._ready:
            if len(self._fixations) >= self.capacity:
                self._ready.wait_for(lambda: len(self._fixations) < self.capacity, timeout)
                if len(self._fixations) >= self.capacity:
                    return False
            self._fixations.append(fix)
            self._ready.notify_all()
            return True

    def put_command(self, ctl: Control) -> bool:
        """Queue a command ahead of every fixation; False when ``command_capacity`` are waiting."""
        with self._ready:
            if len(self._commands) >= self.command_capacity:
                return False
            self._commands.append(ctl)
            self._ready.notify_all()
            return True

    def get(self, timeout: float) -> Message | None:
        """The oldest command, else the oldest fixation, waiting up to ``timeout`` s for either."""
        with self._ready:
            if timeout > 0:
                self._ready.wait_for(lambda: self._commands or self._fixations, timeout)
            msg: Message | None = None
            if self._commands:
                msg = self._commands.popleft()
            elif self._fixations:
                msg = self._fixations.popleft()
                self._ready.notify_all()  # room for a producer waiting in put_fixation
            return msg

    def commands(self) -> list[Control]:
        """Every command waiting now (never waits)."""
        with self._ready:
            out = list(self._commands)
            self._commands.clear()
            return out

    def fixations(self) -> int:
        """Fixations waiting."""
        return len(self._fixations)

    def command_count(self) -> int:
        """Commands waiting."""
        return len(self._commands)


class Broker(ABC):
    """The queue between the API and the worker (see the module docstring)."""

    settings: Settings

    # --- API side (async) ------------------------------------------------------------------------
    async def start_api(self) -> None:  # noqa: B027  (optional hook)
        """Open what the API side needs (connections, the event loop reference)."""

    async def close_api(self) -> None:  # noqa: B027
        """Release what :meth:`start_api` opened."""

    @abstractmethod
    async def submit(self, fixations: Sequence[Fixation], *, wait: bool) -> None:
        """Queue fixations for the worker, in order; each gets a ``request_id`` if it has none.

        Raises ``QueueFull`` (nothing queued) when the backlog would pass ``max_queue``, and
        ``WorkerUnavailable`` when ``wait`` is set but no worker is alive.
        """

    @abstractmethod
    async def result(self, request_id: str, timeout: float) -> dict[str, Any]:
        """The worker's reply to a submitted request; ``WorkerTimeout`` after ``timeout`` seconds."""

    async def results(
        self, request_ids: Sequence[str], timeout: float
    ) -> list[dict[str, Any] | FoveateError]:
        """The replies to a batch's requests, in order; an item not answered within ``timeout`` has
        its error (``WorkerTimeout``, ``WorkerUnavailable``) in its place instead of raising."""
        done = await asyncio.gather(*(self.result(r, timeout) for r in request_ids), return_exceptions=True)
        for item in done:
            if not isinstance(item, (dict, FoveateError)):
                raise item  # a bug, not an answer
        return done  # type: ignore[return-value]

    async def command(self, control: Control, timeout: float | None = None) -> dict[str, Any]:
        """Send a command to the worker and return its reply payload."""
        control.request_id = control.request_id or new_request_id()
        await self._send_control(control, self.settings.sync_timeout_s if timeout is None else timeout)
        return await self.result(
            control.request_id, self.settings.sync_timeout_s if timeout is None else timeout
        )

    @abstractmethod
    async def _send_control(self, control: Control, timeout: float) -> None: ...

    @abstractmethod
    async def worker_alive(self) -> tuple[bool, str]:
        """(alive, why) for ``/readyz``."""

    async def worker_load(self) -> tuple[int, float | None]:
        """(fixations waiting, the worker's service rate in fixations/s or None) for ``/readyz``: the
        worker's last heartbeat (service/backpressure.py)."""
        return 0, None

    # --- worker side (blocking) --------------------------------------------------------------
    @abstractmethod
    def start_worker(self, decode: Decoder, *, after: str | None = None) -> str | None:
        """Start receiving; ``decode`` turns undecoded payloads into patches off the tick thread.

        A broker that keeps its messages (Redis) first delivers again, in order, every input entry
        after ``after`` (the input offset of the worker's checkpoint: every entry up to it is in the
        checkpoint) that any consumer has already read, then new ones; with ``after=None`` (no
        checkpoint) it starts before the oldest entry still unacknowledged. It returns the offset it
        started from, or None when it keeps nothing to deliver again (the in-process queue).
        """

    @abstractmethod
    def get(self, timeout: float) -> Message | None:
        """The next message, waiting up to ``timeout`` s (0: do not wait): a waiting command first,
        else the oldest fixation."""

    def commands(self) -> list[Control]:
        """The commands waiting now, without waiting: the worker answers them between ticks."""
        return []

    @abstractmethod
    def reply(self, replies: Sequence[tuple[Message, dict[str, Any]]]) -> None:
        """Publish the payloads for these messages, then acknowledge them."""

    def heartbeat(self, info: dict[str, Any]) -> None:  # noqa: B027
        """Tell the API side the worker is alive."""

    def backlog(self) -> int:
        """Messages queued in the broker that the worker has not received yet."""
        return 0

    def unanswered_after(self, offset: str | None) -> bool:
        """Whether a fixation the worker has not answered is still here, read now (never a cached
        reading): the stop's drain of a distributed rank asks it until the answer is no. ``offset``:
        the worker's input offset, for a broker that re-reads its input (service/streams.py)."""
        return self.backlog() > 0

    def forget_stream(self, stream_id: str) -> None:  # noqa: B027
        """Drop what the broker keeps about a deleted stream (its results stream in Redis)."""

    def stop_worker(self) -> None:  # noqa: B027
        """Stop receiving (threads, connections)."""

    # --- the command journal (service/journal.py), kept by a broker that re-reads its input ---
    def journal(self, fields: dict[str, str]) -> str:
        """Append a command record durably and return its id; ``WorkerUnavailable`` when it could not
        be written. Only a broker whose :meth:`start_worker` returns an offset keeps a journal."""
        raise NotImplementedError(f"{type(self).__name__} keeps no command journal")

    def journal_after(self, after: str | None) -> list[tuple[str, dict[str, Any]]]:
        """The records after id ``after`` (all with None), in order: (id, fields)."""
        return []

    def journal_last(self) -> str | None:
        """The id of the newest record, None when there is none."""
        return None

    def journal_trim(self, through: str) -> None:  # noqa: B027
        """Drop the records up to id ``through`` (a committed checkpoint holds their effect)."""


class LocalBroker(Broker):
    """In-process broker for the embedded mode: a bounded queue and asyncio futures.

    Examples
    --------
    >>> broker = LocalBroker(Settings(max_queue=4))
    >>> broker.backlog()
    0
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.inbox = Inbox(settings.max_queue)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._decode: Decoder | None = None
        self._ids = itertools.count(1)
        self._last_beat = 0.0
        self._load: tuple[int, float | None] = (0, None)  # the heartbeat's backlog and service rate
        self._tick_s: float | None = None  # the heartbeat's mean tick time

    async def start_api(self) -> None:
        self._loop = asyncio.get_running_loop()

    def _expect(self, request_id: str) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._waiters[request_id] = self._loop.create_future()

    async def submit(self, fixations: Sequence[Fixation], *, wait: bool) -> None:
        # Only this event loop puts, so the check below cannot be raced into overflowing the queue.
        waiting = self.inbox.fixations()
        if waiting + len(fixations) > self.settings.max_queue:
            excess = waiting + len(fixations) - self.settings.max_queue
            raise QueueFull(
                f"{waiting} fixations are waiting for the worker "
                f"(limit {self.settings.max_queue}); retry later or send fewer at once",
                retry_after=queue_full_retry_after(excess, self._load[1]),
            )
        if wait:
            refuse_late(fixations, waiting, self._load[1], self._tick_s, self.settings.sync_timeout_s)
        for fix in fixations:
            fix.request_id = fix.request_id or new_request_id()
            fix.entry_id = f"local-{next(self._ids)}"
            if wait:
                self._expect(fix.request_id)
            self.inbox.put_fixation(fix)

    async def _send_control(self, control: Control, timeout: float) -> None:
        assert control.request_id is not None
        self._expect(control.request_id)
        if not self.inbox.put_command(control):
            self._waiters.pop(control.request_id, None)
            raise QueueFull(
                f"{self.inbox.command_capacity} commands are waiting for the worker; retry later",
                retry_after=1.0,
            )

    async def result(self, request_id: str, timeout: float) -> dict[str, Any]:
        future = self._waiters.get(request_id)
        if future is None:
            raise WorkerTimeout(f"request {request_id} was not submitted with wait=true")
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError as exc:
            raise WorkerTimeout(
                f"the worker did not answer within {timeout:g} s (request {request_id}); it is busy or "
                "stuck: retry later, or raise FOVEATE_SYNC_TIMEOUT_S"
            ) from exc
        finally:
            self._waiters.pop(request_id, None)

    async def worker_alive(self) -> tuple[bool, str]:
        age = time.time() - self._last_beat
        if self._decode is None:
            return False, "the worker has not started"
        if age > self.settings.heartbeat_timeout_s:
            return False, f"the worker's last heartbeat was {age:.1f} s ago"
        return True, "worker thread alive"

    async def worker_load(self) -> tuple[int, float | None]:
        return self.inbox.fixations(), self._load[1]

    # --- worker side ---
    def start_worker(self, decode: Decoder, *, after: str | None = None) -> str | None:
        self._decode = decode
        self._last_beat = time.time()
        return None  # the queue dies with the process: nothing to deliver again

    def get(self, timeout: float) -> Message | None:
        msg = self.inbox.get(timeout)
        if isinstance(msg, Fixation) and msg.patch is None and msg.problem is None and self._decode:
            self._decode(msg)
        return msg

    def reply(self, replies: Sequence[tuple[Message, dict[str, Any]]]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        pairs = [(msg.request_id, payload) for msg, payload in replies if msg.request_id]
        if pairs:
            # One hop into the event loop per tick; futures are only touched there.
            loop.call_soon_threadsafe(self._deliver, pairs)

    def _deliver(self, pairs: list[tuple[str, dict[str, Any]]]) -> None:
        for request_id, payload in pairs:
            future = self._waiters.get(request_id)
            if future is not None and not future.done():
                future.set_result(payload)

    def commands(self) -> list[Control]:
        return self.inbox.commands()

    def heartbeat(self, info: dict[str, Any]) -> None:
        self._last_beat = time.time()
        self._load = (int(info.get("queue_depth", 0)), info.get("service_rate"))
        self._tick_s = info.get("tick_s")

    def backlog(self) -> int:
        return self.inbox.fixations()

    def stop_worker(self) -> None:
        self._decode = None


__all__ = [
    "Broker",
    "Decoder",
    "Inbox",
    "LocalBroker",
    "Message",
    "WorkerUnavailable",
    "new_request_id",
]
