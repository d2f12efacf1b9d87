"""The Redis field format: what rigs XADD is parsed, and a bad message says what is wrong."""

from __future__ import annotations

import numpy as np
import pytest

from service.messages import (
    Control,
    Fixation,
    check_stream_id,
    control_from_fields,
    control_to_fields,
    fixation_from_fields,
    fixation_to_fields,
)


def _b(fields: dict[str, object]) -> dict[str, bytes]:
    return {k: v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


def test_raw_patch_round_trip() -> None:
    patch = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    fix = Fixation("s1", seq=3, t=1.5, duration_ms=200.0, reset=True, request_id="r1", patch=patch)
    back = fixation_from_fields(_b(fixation_to_fields(fix)), "1-0")
    assert back.problem is None
    assert (
        back.stream_id,
        back.seq,
        back.t,
        back.duration_ms,
        back.reset,
        back.request_id,
        back.entry_id,
    ) == (
        "s1",
        3,
        1.5,
        200.0,
        True,
        "r1",
        "1-0",
    )
    assert back.source is not None and back.source.kind == "raw" and back.source.shape == (4, 5, 3)
    assert back.source.data == patch.tobytes()


def test_frame_with_degrees() -> None:
    fix = fixation_from_fields(
        _b({"stream_id": "r", "frame": b"jpg", "x": 10, "y": 20.5, "size_deg": 2, "px_per_deg": 30})
    )
    assert fix.problem is None and fix.source is not None
    assert (fix.source.kind, fix.source.x, fix.source.y, fix.source.size_deg) == ("frame", 10.0, 20.5, 2.0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"stream_id": "s", "patch": b"x", "raw": b"y"}, "exactly one"),
        ({"stream_id": "s"}, "exactly one"),
        ({"stream_id": "s", "raw": b"x"}, "shape"),
        ({"stream_id": "s", "raw": b"x", "shape": "2,2"}, "three positive"),
        ({"stream_id": "s", "frame": b"x", "x": 1}, "'x' and 'y'"),
        ({"stream_id": "s", "frame": b"x", "x": 1, "y": 2}, "size_px"),
        ({"stream_id": "s", "patch": b"x", "seq": "abc"}, "'seq' must be a number"),
        ({"stream_id": "s", "patch": b"x", "seq": "1.5"}, "integer"),
        ({"stream_id": "s", "patch": b"x", "t": "nan"}, "finite"),
        ({"stream_id": "s", "patch": b"x", "reset": "maybe"}, "0 or 1"),
        ({"stream_id": "s", "patch": b"x", "duration_ms": "-1"}, ">= 0"),
        ({"stream_id": "bad id!", "patch": b"x"}, "stream_id"),
        ({"patch": b"x"}, "stream_id"),
    ],
)
def test_bad_messages_carry_a_problem(fields: dict[str, object], message: str) -> None:
    fix = fixation_from_fields(_b({"request_id": "r9", **fields}), "5-0")
    assert fix.problem is not None
    assert message in str(fix.problem)
    assert fix.request_id == "r9" and fix.entry_id == "5-0"  # still answerable


def test_stream_ids() -> None:
    assert check_stream_id("rig-1.p07:run_2") == "rig-1.p07:run_2"
    assert check_stream_id("lab-a:" + "x" * 128)  # qualified by a key's namespace
    for bad in ("", "a b", "x" * 162, "é"):
        with pytest.raises(ValueError, match="stream_id"):
            check_stream_id(bad)


def test_control_round_trip_and_unknown_commands() -> None:
    ctl = control_from_fields(_b(control_to_fields(Control("reset", {"stream_id": "a"}, "r1"))), "2-0")
    assert (ctl.command, ctl.args, ctl.request_id, ctl.entry_id) == ("reset", {"stream_id": "a"}, "r1", "2-0")
    assert control_from_fields(_b({"command": "format-disk", "request_id": "r"})).command == "invalid"
    assert control_from_fields(_b({"command": "reset", "args": "{not json"})).command == "invalid"
