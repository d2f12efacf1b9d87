"""The SDK against a real server: ``python -m foveate serve`` (small model) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from clients import sdk
from clients.recorded import RecordedDataset, bundled_dataset_path
from learner.patches import cut_patch
from tests.clients._servers import FoveateProcess, free_port, start_server

# A batch of more fixations than the queue holds is always refused with 429 QueueFull.
MAX_QUEUE = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FoveateProcess]:
    proc = start_server(tmp_path_factory.mktemp("serve"), FOVEATE_MAX_QUEUE=str(MAX_QUEUE))
    yield proc
    proc.stop()


@pytest.fixture
def client(server: FoveateProcess) -> Iterator[sdk.FoveateClient]:
    with sdk.FoveateClient(server.url, timeout=30.0) as c:
        yield c


@pytest.fixture(scope="module")
def scanpath() -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Subject 1's first image of the bundled OSIE data: the frame (RGB) and its gaze points."""
    ds = RecordedDataset.open(bundled_dataset_path())
    image = ds.images[0]
    return np.array(ds.load_image(image)), [(f.x, f.y) for f in ds.scanpath(image, "1")]


def test_health_ready_and_model(client: sdk.FoveateClient) -> None:
    assert client.health().status == "ok"
    ready = client.ready()
    assert (ready.status, ready.mode) == ("ready", "embedded")
    model = client.model()
    assert model.config["n_units"] == 64 and model.config["embed_dim"] == 16
    assert model.trainable_parameters > 0 and model.learner == "rfp"


def test_a_scanpath_scores_from_the_second_fixation_and_restarts_after_reset(
    client: sdk.FoveateClient, scanpath: tuple[np.ndarray, list[tuple[float, float]]]
) -> None:
    frame, gaze = scanpath
    patches = [cut_patch(frame, x, y, 48) for x, y in gaze]
    results = [client.post_fixation("sdk-scan", p, seq=i, reset=i == 0) for i, p in enumerate(patches)]
    assert [r.step for r in results] == list(range(1, len(patches) + 1))
    assert results[0].error is None and results[0].running_error is None
    assert all(r.error is not None and r.error >= 0 for r in results[1:])
    assert [r.seq for r in results] == list(range(len(patches)))
    assert results[-1].updates_applied > results[0].updates_applied
    again = client.post_fixation("sdk-scan", patches[0], reset=True)
    assert (again.step, again.error) == (1, None)
    info = client.stream("sdk-scan")
    assert info.fixations == len(patches) + 1 and info.resets == 2 and info.last_seq == len(patches) - 1
    assert info.scored == len(patches) - 1
    assert [e.step for e in info.recent_errors] == list(range(2, len(patches) + 1))


def test_every_image_form_is_learned_from(
    client: sdk.FoveateClient, scanpath: tuple[np.ndarray, list[tuple[float, float]]]
) -> None:
    frame, gaze = scanpath
    (x0, y0), (x1, y1) = gaze[:2]
    patch = cut_patch(frame, x1, y1, 48)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    assert ok
    steps = [
        client.post_fixation("sdk-forms", cut_patch(frame, x0, y0, 48), reset=True).step,  # PNG
        client.post_fixation("sdk-forms", patch, encoding="raw").step,
        client.post_fixation("sdk-forms", patch, encoding="jpeg").step,
        client.post_fixation("sdk-forms", sdk.encode_image(patch, "png")).step,  # file bytes as they are
        client.post_fixation("sdk-forms", frame=frame, x=x1, y=y1, size_px=48).step,
        client.post_fixation(
            "sdk-forms", frame=jpeg.tobytes(), x=x1, y=y1, size_deg=2.0, px_per_deg=24.0
        ).step,
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_prediction_is_returned_and_matches_the_stream_prediction(client: sdk.FoveateClient) -> None:
    rng = np.random.default_rng(0)
    client.post_fixation("sdk-pred", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), reset=True)
    result = client.post_fixation(
        "sdk-pred", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), return_prediction=True
    )
    assert result.prediction is not None and result.prediction.shape == (16,)
    stored = client.prediction("sdk-pred")
    assert stored.step == 2 and stored.prediction is not None
    np.testing.assert_allclose(stored.prediction, result.prediction, rtol=1e-5, atol=1e-6)


def test_wait_false_is_accepted_then_applied(client: sdk.FoveateClient) -> None:
    patch = np.full((32, 32, 3), 90, np.uint8)
    accepted = client.post_fixation("sdk-nowait", patch, seq=0, reset=True, wait=False)
    assert isinstance(accepted, sdk.Accepted) and accepted.status == "queued" and accepted.request_id
    deadline = time.monotonic() + 20
    while True:
        try:
            info = client.stream("sdk-nowait")
            break
        except sdk.UnknownStream:
            assert time.monotonic() < deadline, "the queued fixation was never applied"
            time.sleep(0.05)
    assert info.fixations == 1 and info.last_seq == 0


def test_batch_applies_in_order_and_rejects_a_bad_item_alone(client: sdk.FoveateClient) -> None:
    rng = np.random.default_rng(1)
    items: list[sdk.FixationItem | dict[str, object]] = [
        sdk.FixationItem("sdk-batch-a", patch=rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), reset=True),
        sdk.FixationItem("sdk-batch-b", patch=rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), reset=True),
        {"stream_id": "sdk-batch-a", "patch": b"not an image"},
        sdk.FixationItem("sdk-batch-a", patch=rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), seq=7),
    ]
    out = client.post_fixations(items, return_prediction=True)
    assert [i.ok for i in out] == [True, True, False, True]
    assert isinstance(out[2].error, sdk.PatchError) and "decode" in out[2].error.detail
    first, second, last = out[0].unwrap(), out[1].unwrap(), out[3].unwrap()
    assert isinstance(first, sdk.FixationResult) and isinstance(second, sdk.FixationResult)
    assert isinstance(last, sdk.FixationResult)
    assert (first.stream_id, first.step, second.step, last.step, last.seq) == ("sdk-batch-a", 1, 1, 2, 7)
    assert last.prediction is not None and last.prediction.shape == (16,)


def test_streams_reset_and_delete(client: sdk.FoveateClient) -> None:
    patch = np.full((32, 32, 3), 30, np.uint8)
    client.post_fixation("sdk-life", patch, reset=True)
    client.post_fixation("sdk-life", patch)
    listed = {s.stream_id: s for s in client.streams()}
    assert listed["sdk-life"].step == 2 and listed["sdk-life"].fixations == 2
    assert client.reset("sdk-life") == sdk.ResetResult(stream_id="sdk-life", step=0)
    assert client.post_fixation("sdk-life", patch).step == 1  # a reset stream starts again, unscored
    assert client.delete("sdk-life") is True
    assert "sdk-life" not in {s.stream_id for s in client.streams()}
    with pytest.raises(sdk.UnknownStream) as info:
        client.stream("sdk-life")
    assert info.value.status_code == 404 and "sdk-life" in info.value.detail
    with pytest.raises(sdk.UnknownStream):
        client.delete("sdk-life")


def test_server_errors_arrive_as_typed_exceptions(client: sdk.FoveateClient) -> None:
    with pytest.raises(sdk.PatchError) as bad_image:
        client.post_fixation("sdk-err", b"\x89PNG but not really")
    assert bad_image.value.status_code == 422
    with pytest.raises(sdk.InputError) as bad_id:
        client.post_fixation("no spaces allowed", np.zeros((8, 8, 3), np.uint8))
    assert bad_id.value.status_code == 422 and "stream_id" in bad_id.value.detail
    with pytest.raises(sdk.PatchError, match="off the frame"):
        client.post_fixation("sdk-err", frame=np.zeros((50, 50, 3), np.uint8), x=500, y=500, size_px=20)
    with pytest.raises(sdk.ConfigError, match="checkpoint"):  # the test server runs without checkpoints
        client.checkpoint()


def test_queue_full_is_retried_after_retry_after_then_raised(server: FoveateProcess) -> None:
    events: list[sdk.RetryEvent] = []
    # the server's Retry-After (whole seconds) is capped at 0.05 s here, to keep the test short
    policy = sdk.RetryPolicy(max_retries=2, backoff=0.01, jitter=0.0, max_retry_after=0.05)
    too_many = [
        sdk.FixationItem(f"sdk-q{i}", patch=np.zeros((8, 8, 3), np.uint8)) for i in range(MAX_QUEUE + 1)
    ]
    with sdk.FoveateClient(server.url, retry=policy, on_retry=events.append) as client:
        with pytest.raises(sdk.QueueFull) as info:
            client.post_fixations(too_many)
    assert info.value.status_code == 429
    assert [(e.attempt, e.reason) for e in events] == [(1, "HTTP 429 QueueFull"), (2, "HTTP 429 QueueFull")]
    assert all(e.retry_after is not None and e.retry_after >= 1 for e in events)  # the server said when
    assert [e.delay for e in events] == pytest.approx([0.05, 0.05])


def test_connect_error_when_nothing_listens() -> None:
    events: list[sdk.RetryEvent] = []
    policy = sdk.RetryPolicy(max_retries=2, backoff=0.01)
    with sdk.FoveateClient(f"http://127.0.0.1:{free_port()}", retry=policy, on_retry=events.append) as client:
        with pytest.raises(sdk.ConnectError):
            client.health()
    assert len(events) == 2


def test_async_client_runs_streams_concurrently(server: FoveateProcess) -> None:
    rng = np.random.default_rng(2)
    patches = rng.integers(0, 256, (4, 5, 32, 32, 3), dtype=np.uint8)  # (streams, fixations, P, P, 3)

    async def one_stream(client: sdk.AsyncFoveateClient, k: int) -> list[sdk.FixationResult]:
        return [
            await client.post_fixation(f"sdk-async-{k}", patches[k, i], seq=i, reset=i == 0)
            for i in range(patches.shape[1])
        ]

    async def main() -> tuple[list[list[sdk.FixationResult]], list[sdk.StreamSummary], sdk.Ready]:
        async with sdk.AsyncFoveateClient(server.url) as client:
            ready = await client.wait_ready(timeout=10)
            runs = await asyncio.gather(*(one_stream(client, k) for k in range(patches.shape[0])))
            return list(runs), await client.streams(), ready

    runs, streams, ready = asyncio.run(main())
    assert ready.status == "ready"
    for k, results in enumerate(runs):
        assert [r.stream_id for r in results] == [f"sdk-async-{k}"] * 5
        assert [r.step for r in results] == [1, 2, 3, 4, 5]
        assert [r.error is None for r in results] == [True, False, False, False, False]
    names = {s.stream_id for s in streams}
    assert {f"sdk-async-{k}" for k in range(4)} <= names


def test_client_reads_foveate_url_from_the_environment(
    server: FoveateProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FOVEATE_URL", server.url + "/")
    with sdk.FoveateClient() as client:
        assert client.base_url == server.url
        assert client.health().status == "ok"
