"""The SDK, replay and the bridges' sink against a real server that wants API keys (uvicorn in a thread)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import clients.sdk as sdk
from clients.bridges.common import OutgoingFixation, SdkSink, SinkUnavailable
from clients.recorded import RecordedDataset
from clients.replay import ReplayOptions, replay
from service.auth import new_key
from tests.service._support import ThreadedServer, small_settings

PATCH = np.random.default_rng(5).integers(0, 255, (32, 32, 3), dtype=np.uint8)
BUNDLED = Path(__file__).resolve().parents[2] / "data" / "osie-mini"


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[str, dict[str, str]]]:
    from service.api.main import create_app

    tokens, lines = {}, []
    for name, scopes in (("rw", {"ingest", "read"}), ("ro", {"read"})):
        tokens[name], key = new_key("lab-sdk", scopes)
        lines.append(key.line())
    app = create_app(small_settings(api_keys=";".join(lines)))
    server = ThreadedServer(app).start()
    yield server.url, tokens
    server.stop()


def test_the_key_from_an_argument_or_the_environment(
    keyed: tuple[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, tokens = keyed
    monkeypatch.delenv(sdk.API_KEY_ENV, raising=False)
    with sdk.FoveateClient(url, api_key=tokens["rw"]) as client:
        assert client.post_fixation("s1", PATCH, reset=True).step == 1
        assert client.reset("s1").step == 0  # a POST with the body {}
        assert [s.stream_id for s in client.streams()] == ["s1"]
        assert "s1" not in repr(client) and tokens["rw"] not in repr(client)
    monkeypatch.setenv(sdk.API_KEY_ENV, tokens["ro"])
    with sdk.FoveateClient(url) as client:
        assert client.stream("s1").stream_id == "s1"
        with pytest.raises(sdk.Forbidden, match="ingest"):
            client.post_fixation("s1", PATCH)
    monkeypatch.delenv(sdk.API_KEY_ENV)
    with sdk.FoveateClient(url) as client:
        with pytest.raises(sdk.Unauthorized, match="API key") as info:
            client.streams()
        assert info.value.status_code == 401
        assert client.health().status == "ok"  # /healthz is open


def test_the_async_client_sends_the_key(keyed: tuple[str, dict[str, str]]) -> None:
    url, tokens = keyed

    async def main() -> None:
        async with sdk.AsyncFoveateClient(url, api_key=tokens["rw"]) as client:
            assert (await client.post_fixation("s2", PATCH)).stream_id == "s2"
        async with sdk.AsyncFoveateClient(url, api_key="fov_0000abcd_" + "x" * 43) as client:
            with pytest.raises(sdk.Unauthorized):
                await client.streams()

    asyncio.run(main())


def test_a_header_cannot_be_smuggled_in_the_key() -> None:
    with pytest.raises(sdk.InputError, match="one line"):
        sdk.FoveateClient("http://127.0.0.1:9", api_key="fov_x\r\nX-Evil: 1")


def test_replay_passes_the_key_and_stops_on_a_bad_one(keyed: tuple[str, dict[str, str]]) -> None:
    url, tokens = keyed
    dataset = RecordedDataset.open(BUNDLED)
    opts = ReplayOptions(subjects=[dataset.subjects[0]], images=1, encoding="raw")
    _, summary = replay(dataset, url, opts, api_key=tokens["rw"])
    assert summary.fixations > 0 and summary.skipped == 0
    with pytest.raises(sdk.Unauthorized):
        replay(dataset, url, opts, api_key="fov_0000abcd_" + "y" * 43)


def test_the_bridge_sink_keeps_fixations_while_the_key_is_refused(keyed: tuple[str, dict[str, str]]) -> None:
    url, tokens = keyed
    fix = OutgoingFixation(seq=0, t=0.0, duration_ms=200.0, x=0.0, y=0.0, patch=PATCH, reset=True)
    good = SdkSink(url, api_key=tokens["rw"])
    assert good("bridge-1", fix).step == 1
    bad = SdkSink(url, api_key=tokens["ro"])
    with pytest.raises(SinkUnavailable, match="Forbidden"):
        bad("bridge-1", fix)
    good.close()
    bad.close()
