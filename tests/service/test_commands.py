"""The worker's command table: exactly one handler per command the control stream may carry."""

from __future__ import annotations

from collections import Counter

from service.commands import HANDLERS
from service.messages import COMMANDS, control_from_fields


def test_every_command_has_exactly_one_handler_and_every_handler_a_command() -> None:
    assert [name for name, n in Counter(COMMANDS).items() if n > 1] == []
    assert set(HANDLERS) == set(COMMANDS)
    assert len(set(map(id, HANDLERS.values()))) == len(HANDLERS)  # no handler answers two commands


def test_a_command_without_a_handler_never_reaches_the_worker() -> None:
    assert control_from_fields({"command": b"stream", "args": b"{}"}).command == "stream"
    broken = control_from_fields({"command": b"nonsense", "args": b"{}"})
    assert broken.command == "invalid" and broken.command not in HANDLERS
