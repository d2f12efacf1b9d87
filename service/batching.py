"""How the worker forms one learner tick from the messages it receives.

A tick advances every stream in it by one step, so it can hold **one fixation per stream**; a
stream's next fixation must wait for the next tick. :class:`TickBatcher` keeps those back and
decides when a tick is complete:

- a tick takes at most ``max_batch`` fixations, each of another stream;
- fixations held back from earlier ticks go first, the stream held longest first, so every
  stream's fixations are applied in the order they arrived;
- after a tick's first fixation it waits at most ``max_wait_s`` for more (the latency a fixation
  may pay for a fuller tick); with nothing to do it waits ``idle_poll_s`` so that the worker's loop
  still does its housekeeping;
- a command ends the tick: the worker answers it right after the tick, in arrival order;
- it stops receiving while ``held_cap`` fixations are held back (one stream sending faster than the
  worker ticks), so that they stay queued in the broker, which refuses new ones when full (429),
  instead of piling up in the worker's memory.

Examples
--------
>>> from collections import deque
>>> inbox = deque([Fixation("a", seq=1), Fixation("a", seq=2), Fixation("b", seq=1)])
>>> batcher = TickBatcher(max_batch=8, max_wait_s=0.0)
>>> get = lambda timeout: inbox.popleft() if inbox else None
>>> [(f.stream_id, f.seq) for f in batcher.gather(get)[0]]
[('a', 1), ('b', 1)]
>>> [(f.stream_id, f.seq) for f in batcher.gather(get)[0]]
[('a', 2)]
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from service.messages import Control, Fixation

#: Receives the next message, waiting up to the given seconds (``Broker.get``).
Receive = Callable[[float], Fixation | Control | None]


class TickBatcher:
    """Gathers the fixations of one tick, at most one per stream (see the module docstring).

    Parameters
    ----------
    max_batch
        Fixations per tick at most (``FOVEATE_MAX_BATCH``).
    max_wait_s
        How long a tick waits for more fixations after its first (``FOVEATE_MAX_WAIT_MS`` / 1000).
    idle_poll_s
        How long an empty tick waits for a first message before it returns.
    held_cap
        Fixations held back at most before it stops receiving; ``4 * max_batch`` when ``None``.
    """

    def __init__(
        self, max_batch: int, max_wait_s: float, *, idle_poll_s: float = 0.1, held_cap: int | None = None
    ) -> None:
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.idle_poll_s = idle_poll_s
        self.held_cap = 4 * max_batch if held_cap is None else held_cap
        self._held: OrderedDict[str, deque[Fixation]] = OrderedDict()

    @property
    def held(self) -> int:
        """Fixations received and held back for a later tick."""
        return sum(len(q) for q in self._held.values())

    def gather(
        self, receive: Receive, stopping: Callable[[], bool] = lambda: False
    ) -> tuple[list[Fixation], list[Control]]:
        """The next tick's fixations, and the commands to answer after it (at most one).

        Returns at once, with what it has, when ``stopping()`` becomes true.
        """
        batch: dict[str, Fixation] = {}
        for sid in list(self._held):
            if len(batch) >= self.max_batch:
                break
            held = self._held[sid]
            batch[sid] = held.popleft()
            if not held:
                del self._held[sid]
        controls: list[Control] = []
        deadline = time.monotonic() + self.max_wait_s if batch else None
        while len(batch) < self.max_batch and self.held < self.held_cap and not stopping():
            timeout = self.idle_poll_s if deadline is None else max(0.0, deadline - time.monotonic())
            msg = receive(timeout)
            if msg is None:
                break
            if isinstance(msg, Control):
                controls.append(msg)
                break
            if deadline is None:
                deadline = time.monotonic() + self.max_wait_s
            sid = msg.stream_id
            if sid in batch or sid in self._held:
                self._held.setdefault(sid, deque()).append(msg)
            else:
                batch[sid] = msg
        return list(batch.values()), controls
