"""SDK client logic with ``httpx.MockTransport``: retries, backoff, Retry-After, error mapping, bodies.

Only the pure client logic is tested here; ``test_sdk_server.py`` runs the SDK against a real server.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import random
import time
from collections.abc import Callable
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from clients import sdk
from clients.sdk import errors
from clients.sdk.retry import parse_retry_after

FAST = sdk.RetryPolicy(max_retries=3, backoff=0.001, max_backoff=0.004, jitter=0.0)
RESULT = {"stream_id": "s1", "seq": 0, "step": 1, "error": None, "running_error": None, "updates_applied": 0}


def error_response(status: int, name: str, detail: str = "why", headers: dict[str, str] | None = None) -> Any:
    return httpx.Response(status, json={"error": name, "detail": detail}, headers=headers)


class Script:
    """A MockTransport handler that answers from a list, recording every request."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def client_with(
    script: Script, retry: sdk.RetryPolicy = FAST, **kw: Any
) -> tuple[sdk.FoveateClient, list[Any]]:
    events: list[sdk.RetryEvent] = []
    client = sdk.FoveateClient(
        "http://foveate.test",
        transport=httpx.MockTransport(script),
        retry=retry,
        on_retry=events.append,
        **kw,
    )
    return client, events


PATCH = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)


# ---------------------------------------------------------------- retries


def test_429_is_retried_until_success_with_exponential_backoff() -> None:
    script = Script(
        error_response(429, "QueueFull"), error_response(429, "QueueFull"), httpx.Response(200, json=RESULT)
    )
    policy = sdk.RetryPolicy(max_retries=5, backoff=0.01, max_backoff=1.0, jitter=0.0)
    client, events = client_with(script, policy)
    result = client.post_fixation("s1", PATCH, seq=0, reset=True)
    assert result.step == 1 and result.error is None
    assert len(script.requests) == 3
    assert [e.attempt for e in events] == [1, 2]
    assert [e.delay for e in events] == pytest.approx([0.01, 0.02])
    assert events[0].reason == "HTTP 429 QueueFull"
    # The body was encoded once and sent identically each time.
    assert len({r.content for r in script.requests}) == 1


def test_503_retries_stop_at_max_and_raise_the_mapped_error() -> None:
    script = Script(error_response(503, "WorkerUnavailable", "no live worker"))
    client, events = client_with(script)
    with pytest.raises(sdk.WorkerUnavailable) as info:
        client.model()
    assert len(script.requests) == FAST.max_retries + 1
    assert len(events) == FAST.max_retries
    assert info.value.status_code == 503 and info.value.detail == "no live worker"
    assert "no live worker" in str(info.value) and "503" in str(info.value)


def test_retry_after_header_sets_the_wait() -> None:
    script = Script(
        error_response(429, "TooManyStreams", headers={"Retry-After": "0.2"}),
        httpx.Response(200, json=RESULT),
    )
    client, events = client_with(script)
    start = time.perf_counter()
    client.post_fixation("s1", PATCH)
    assert events[0].retry_after == pytest.approx(0.2)
    assert events[0].delay == pytest.approx(0.2)
    assert time.perf_counter() - start >= 0.19


def test_retry_after_is_capped() -> None:
    policy = sdk.RetryPolicy(max_retries=1, max_retry_after=0.05)
    script = Script(
        error_response(503, "WorkerUnavailable", headers={"Retry-After": "3600"}),
        httpx.Response(200, json=RESULT),
    )
    client, events = client_with(script, policy)
    client.post_fixation("s1", PATCH)
    assert events[0].delay == pytest.approx(0.05)


def test_retry_after_http_date_and_garbage() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    request = httpx.Request("GET", "http://x")
    assert 25 < parse_retry_after(httpx.Response(429, headers={"Retry-After": when}, request=request)) <= 30  # type: ignore[operator]
    assert parse_retry_after(httpx.Response(429, headers={"Retry-After": "soon"}, request=request)) is None
    assert parse_retry_after(httpx.Response(429, headers={"Retry-After": "-3"}, request=request)) is None
    assert parse_retry_after(httpx.Response(429, request=request)) is None


def test_jitter_keeps_delays_within_bounds_and_spreads_them() -> None:
    policy = sdk.RetryPolicy(backoff=1.0, max_backoff=8.0, jitter=0.5, rng=random.Random(1))
    for attempt, cap in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 8.0)):
        delays = [policy.delay(attempt) for _ in range(200)]
        assert min(delays) >= cap * 0.5 and max(delays) <= cap
        assert max(delays) - min(delays) > cap * 0.3  # jittered, not constant


def test_bad_policy_values_raise() -> None:
    with pytest.raises(ValueError, match="jitter"):
        sdk.RetryPolicy(jitter=1.5)
    with pytest.raises(ValueError, match="max_retries"):
        sdk.RetryPolicy(max_retries=-1)


def test_connect_errors_are_retried_then_raise_connect_error() -> None:
    script = Script(httpx.ConnectError("refused"))
    client, events = client_with(script)
    with pytest.raises(sdk.ConnectError, match="is the server running"):
        client.post_fixation("s1", PATCH)
    assert len(script.requests) == FAST.max_retries + 1
    assert events[0].reason.startswith("ConnectError")


def test_connect_error_then_success() -> None:
    script = Script(httpx.ConnectError("refused"), httpx.Response(200, json={"status": "ok"}))
    client, _ = client_with(script)
    assert client.health() == sdk.Health(status="ok")


def test_read_timeout_is_retried_for_get_but_not_for_post() -> None:
    # A POST that timed out may have been applied: retrying could apply a fixation twice.
    post = Script(httpx.ReadTimeout("slow"))
    client, _ = client_with(post)
    with pytest.raises(sdk.RequestTimeout):
        client.post_fixation("s1", PATCH)
    assert len(post.requests) == 1
    get = Script(httpx.ReadTimeout("slow"), httpx.Response(200, json={"streams": [], "count": 0}))
    client, events = client_with(get)
    assert client.streams() == []
    assert len(get.requests) == 2 and len(events) == 1


def test_a_fixation_with_seq_is_sent_again_after_a_dropped_connection() -> None:
    # The server died mid-request (the API SIGKILLed): the fixation may have been applied, but the
    # worker applies each (stream, seq) once and answers a repeat with the original result, so the
    # same body (same seq) is sent again. Without a seq, or in a batch where one item lacks it, not.
    dropped = httpx.RemoteProtocolError("Server disconnected without sending a response.")
    script = Script(dropped, httpx.ConnectError("refused"), httpx.Response(200, json=RESULT))
    client, events = client_with(script)
    assert client.post_fixation("s1", PATCH, seq=0).step == 1
    assert len(script.requests) == 3 and len({r.content for r in script.requests}) == 1
    assert json.loads(script.requests[0].content)["seq"] == 0
    assert events[0].reason.startswith("RemoteProtocolError")
    for send in (
        lambda c: c.post_fixation("s1", PATCH),
        lambda c: c.post_fixations(
            [{"stream_id": "s1", "patch": PATCH, "seq": 0}, {"stream_id": "s1", "patch": PATCH}]
        ),
    ):
        once = Script(dropped)
        client, _ = client_with(once)
        with pytest.raises(sdk.TransportError):
            send(client)
        assert len(once.requests) == 1


def test_retries_stop_when_the_total_wait_would_pass_its_bound() -> None:
    # Retry-After of 0.05 s each time, at most 0.12 s of waiting in all: two retries, not a third.
    policy = sdk.RetryPolicy(max_retries=10, max_total_wait=0.12)
    script = Script(error_response(429, "QueueFull", headers={"Retry-After": "0.05"}))
    client, events = client_with(script, policy)
    with pytest.raises(sdk.QueueFull):
        client.post_fixation("s1", PATCH, seq=0)
    assert len(events) == 2 and len(script.requests) == 3
    assert sum(e.delay for e in events) <= 0.12


@pytest.mark.parametrize("status, name", [(504, "WorkerTimeout"), (422, "PatchError"), (500, "WorkerError")])
def test_other_errors_are_not_retried(status: int, name: str) -> None:
    script = Script(error_response(status, name))
    client, events = client_with(script)
    with pytest.raises(errors.APIError) as info:
        client.post_fixation("s1", PATCH)
    assert type(info.value).__name__ == name
    assert len(script.requests) == 1 and events == []


def test_no_retry_policy_sends_once() -> None:
    script = Script(error_response(429, "QueueFull"))
    client, _ = client_with(script, sdk.NO_RETRY)
    with pytest.raises(sdk.QueueFull):
        client.post_fixation("s1", PATCH)
    assert len(script.requests) == 1


def test_async_client_retries_like_the_sync_one() -> None:
    script = Script(
        error_response(429, "QueueFull"), httpx.ConnectError("down"), httpx.Response(200, json=RESULT)
    )
    events: list[sdk.RetryEvent] = []

    async def main() -> sdk.FixationResult:
        async with sdk.AsyncFoveateClient(
            "http://foveate.test", transport=httpx.MockTransport(script), retry=FAST, on_retry=events.append
        ) as client:
            return await client.post_fixation("s1", PATCH, seq=0)

    result = asyncio.run(main())
    assert result.stream_id == "s1"
    assert [e.reason.split(":")[0] for e in events] == ["HTTP 429 QueueFull", "ConnectError"]


# ---------------------------------------------------------------- error mapping


def test_every_server_error_class_maps_to_the_sdk_class_of_the_same_name() -> None:
    from service import errors as server

    for name in server.__all__:
        klass = getattr(server, name)
        # The two abstract roots are never sent: FoveateError, and ServiceError whose subclasses
        # span 4xx and 5xx (the SDK groups by status instead).
        if klass in (server.FoveateError, server.ServiceError) or not isinstance(klass, type):
            continue
        status = server.status_of(klass)[0]
        exc = errors.error_from_body({"error": name, "detail": "d"}, status)
        assert type(exc).__name__ == name, name
        assert exc.status_code == status
        # The family matches the status: 4xx are RequestRejected, 5xx ServerError.
        assert isinstance(exc, errors.ServerError if status >= 500 else errors.RequestRejected), name


def test_sdk_tree_follows_the_server_tree() -> None:
    assert issubclass(sdk.QueueFull, sdk.Overloaded) and issubclass(sdk.TooManyStreams, sdk.Overloaded)
    assert issubclass(sdk.PatchError, sdk.InputError) and issubclass(sdk.PayloadTooLarge, sdk.InputError)
    assert issubclass(sdk.ArchitectureMismatch, sdk.CheckpointError)
    assert issubclass(sdk.UnknownStream, LookupError)
    for klass in (sdk.APIError, sdk.TransportError, sdk.ProtocolError):
        assert issubclass(klass, sdk.ClientError)


def test_sdk_errors_are_the_learner_family() -> None:
    """One family on the client side: ``except learner.errors.PatchError`` catches the SDK's too."""
    from learner import errors as learner

    assert issubclass(sdk.ClientError, learner.FoveateError)
    same_name = ("InputError", "PatchError", "ConfigError", "TrunkWeightsError", "CheckpointError",
                 "ArchitectureMismatch")  # fmt: skip
    for name in same_name:
        assert issubclass(getattr(sdk, name), getattr(learner, name)), name
    with pytest.raises(learner.PatchError, match="uint8"):
        sdk.FixationItem("s", patch=np.zeros((4, 4, 3), np.float32)).image()


def test_the_sdk_imports_without_torch() -> None:
    """The SDK runs next to an eye tracker without PyTorch: importing it (and its errors' learner
    bases) must not import torch."""
    import subprocess
    import sys

    code = "import sys, clients.sdk, clients.sdk.errors; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "status, family",
    [(418, errors.RequestRejected), (409, errors.RequestRejected), (502, errors.ServerError)],
)
def test_unknown_error_names_map_by_status(status: int, family: type[errors.APIError]) -> None:
    script = Script(error_response(status, "SomethingNew", "later servers"))
    client, _ = client_with(script)
    with pytest.raises(errors.APIError) as info:
        client.model()
    assert type(info.value) is family
    assert info.value.error == "SomethingNew"
    assert "SomethingNew: later servers" in str(info.value)


def test_error_without_foveate_body_keeps_status_and_text() -> None:
    script = Script(httpx.Response(502, text="<html>Bad Gateway</html>"))
    client, _ = client_with(script)
    with pytest.raises(errors.ServerError, match="Bad Gateway") as info:
        client.health()
    assert info.value.status_code == 502


def test_success_without_json_is_a_protocol_error() -> None:
    script = Script(httpx.Response(200, text="hello"))
    client, _ = client_with(script)
    with pytest.raises(errors.ProtocolError, match="not JSON"):
        client.health()
    script = Script(httpx.Response(200, json={"unexpected": 1}))
    client, _ = client_with(script)
    with pytest.raises(errors.ProtocolError, match="lacks"):
        client.model()


def test_batch_items_carry_their_errors_without_raising() -> None:
    rejected = {"error": "PatchError", "detail": "cannot decode"}
    body = {"results": [{"ok": True, "result": RESULT}, {"ok": False, "rejected": rejected}]}
    script = Script(httpx.Response(200, json=body))
    client, _ = client_with(script)
    items = client.post_fixations([sdk.FixationItem("s1", patch=PATCH), {"stream_id": "s1", "patch": b"xx"}])
    assert items[0].ok and items[0].unwrap() == sdk.FixationResult.from_json(RESULT)
    assert not items[1].ok and isinstance(items[1].error, sdk.PatchError)
    with pytest.raises(sdk.PatchError, match="cannot decode"):
        items[1].unwrap()
    sent = json.loads(script.requests[0].content)["fixations"]
    assert [f["stream_id"] for f in sent] == ["s1", "s1"]
    assert base64.b64decode(sent[1]["patch_b64"]) == b"xx"


# ---------------------------------------------------------------- request bodies


def sent_json(script: Script) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(script.requests[-1].content)
    return data


def decode_png(text: str) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None
    rgb: np.ndarray = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return rgb


def test_patch_array_is_sent_as_lossless_png_by_default() -> None:
    script = Script(httpx.Response(200, json={**RESULT, "prediction": [0.5, -1.0]}))
    client, _ = client_with(script)
    result = client.post_fixation(
        "s1", PATCH, seq=3, t=1.5, duration_ms=200, reset=True, return_prediction=True
    )
    body = sent_json(script)
    assert set(body) == {"patch_b64", "seq", "t", "duration_ms", "reset"}
    np.testing.assert_array_equal(decode_png(body["patch_b64"]), PATCH)  # RGB order kept
    assert (body["seq"], body["t"], body["duration_ms"], body["reset"]) == (3, 1.5, 200, True)
    request = script.requests[-1]
    assert request.url.path == "/v1/streams/s1/fixations"
    assert request.url.params["wait"] == "true" and request.url.params["return_prediction"] == "true"
    assert result.prediction is not None and result.prediction.dtype == np.float32
    np.testing.assert_array_equal(result.prediction, [0.5, -1.0])


def test_raw_encoding_sends_pixels_and_shape() -> None:
    script = Script(httpx.Response(200, json=RESULT))
    client, _ = client_with(script, encoding="raw")
    client.post_fixation("s1", PATCH[:, :, 0])  # grey (H, W) becomes (H, W, 3)
    body = sent_json(script)
    assert body["shape"] == [8, 8, 3]
    raw = np.frombuffer(base64.b64decode(body["raw_b64"]), np.uint8).reshape(8, 8, 3)
    np.testing.assert_array_equal(raw[:, :, 2], PATCH[:, :, 0])


def test_frame_with_gaze_in_degrees_and_wait_false() -> None:
    script = Script(httpx.Response(202, json={"stream_id": "s1", "request_id": "abc", "status": "queued"}))
    client, _ = client_with(script)
    frame = np.zeros((30, 40, 3), np.uint8)
    accepted = client.post_fixation(
        "s1", frame=frame, x=10.5, y=20, size_deg=2.0, px_per_deg=24.0, wait=False
    )
    assert accepted == sdk.Accepted(stream_id="s1", request_id="abc")
    body = sent_json(script)
    assert set(body) == {"frame_b64", "x", "y", "size_deg", "px_per_deg", "reset"}
    assert decode_png(body["frame_b64"]).shape == (30, 40, 3)
    assert script.requests[-1].url.params["wait"] == "false"


def test_stream_ids_are_quoted_into_the_path() -> None:
    script = Script(httpx.Response(200, json={"stream_id": "a/b", "step": 0}))
    client, _ = client_with(script)
    client.reset("a/b")
    assert script.requests[-1].url.raw_path == b"/v1/streams/a%2Fb/reset"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c: c.post_fixation("s1"), "exactly one image"),
        (lambda c: c.post_fixation("s1", PATCH, frame=PATCH, x=1, y=1, size_px=4), "exactly one image"),
        (lambda c: c.post_fixation("s1", PATCH, x=3.0), "only apply to a frame"),
        (lambda c: c.post_fixation("s1", frame=PATCH, x=1.0, size_px=4), "gaze point x and y"),
        (lambda c: c.post_fixation("s1", frame=PATCH, x=1.0, y=2.0, size_deg=2.0), "size_px, or size_deg"),
        (lambda c: c.post_fixation("s1", PATCH.astype(np.float32)), "uint8"),
        (lambda c: c.post_fixation("s1", np.zeros((4, 4, 2), np.uint8)), r"\(H, W, 3\)"),
        (lambda c: c.post_fixation("", PATCH), "non-empty"),
        (lambda c: c.post_fixations([]), "non-empty list"),
    ],
)
def test_bad_input_is_refused_before_sending(call: Callable[[sdk.FoveateClient], Any], match: str) -> None:
    script = Script(httpx.Response(200, json=RESULT))
    client, _ = client_with(script)
    with pytest.raises(sdk.InputError, match=match):
        call(client)
    assert script.requests == []


def test_models_ignore_unknown_fields() -> None:
    data = {"stream_id": "s", "step": 2, "fixations": 5, "updated_at": 1.0, "new_field": 1}
    info = sdk.StreamInfo.from_json({**data, "recent_errors": [{"step": 2, "error": 0.5}]})
    assert info.recent_errors == [sdk.StepError(step=2, error=0.5)]
    assert info.fixations == 5


def test_results_carry_the_repeat_baseline_and_older_servers_still_parse() -> None:
    scored = {**RESULT, "step": 2, "error": 0.25, "repeat_error": 0.5, "skill": 0.5, "skipped": True}
    result = sdk.FixationResult.from_json(scored)
    assert (result.error, result.repeat_error, result.skill, result.skipped) == (0.25, 0.5, 0.5, True)
    old = sdk.FixationResult.from_json({**RESULT, "step": 2, "error": 0.25})  # before repeat errors
    assert (old.repeat_error, old.skill, old.skipped) == (None, None, False)
    info = sdk.StreamInfo.from_json({
        "stream_id": "s", "step": 3, "fixations": 3, "updated_at": 1.0, "mean_error": 0.25,
        "mean_repeat_error": 0.5, "last_repeat_error": 0.5, "skill": 0.5, "skipped": 1,
        "recent_errors": [{"step": 2, "error": 0.25, "repeat_error": 0.5}],
    })  # fmt: skip
    assert (info.mean_repeat_error, info.last_repeat_error, info.skill, info.skipped) == (0.5, 0.5, 0.5, 1)
    assert info.recent_errors == [sdk.StepError(step=2, error=0.25, repeat_error=0.5)]
