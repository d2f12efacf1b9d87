"""The live page's routes without a browser (tests/service/test_ui_browser.py drives it in Chromium):
the page and its assets are served from the package, /docs names no CDN, the event stream carries
snapshots of the streams and the model, and the live feed keeps bounded rings of errors and thumbnails.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest

from service.live import THUMB_PX, THUMBS_LEN, LiveFeed
from tests.service._support import ThreadedServer, post_patch


def test_page_and_assets_come_from_the_package(embedded: ThreadedServer) -> None:
    for path in ("/", "/ui"):
        r = httpx.get(embedded.url + path)
        assert r.status_code == 200 and "<title>foveate" in r.text
        assert "http://" not in r.text.replace("http://www.w3.org", "") and "https://" not in r.text
    for asset in ("ui.js", "ui.css", "favicon.svg", "vendor/swagger-ui/swagger-ui-bundle.js",
                  "vendor/swagger-ui/LICENSE"):  # fmt: skip
        assert httpx.get(f"{embedded.url}/ui/static/{asset}").status_code == 200, asset


def test_docs_load_swagger_from_this_server(embedded: ThreadedServer) -> None:
    html = httpx.get(embedded.url + "/docs").text
    assert "/ui/static/vendor/swagger-ui/swagger-ui-bundle.js" in html
    assert "cdn" not in html.lower()
    assert "/ui" not in httpx.get(embedded.url + "/openapi.json").json()["paths"]  # the page is not API


def _snapshots(url: str, count: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with httpx.stream("GET", url + "/ui/events?interval=0.25", timeout=60.0) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:") and line != "data: {}":
                out.append(json.loads(line[5:]))
                if len(out) == count:
                    return out
    return out


def test_events_carry_streams_model_and_rates(embedded: ThreadedServer) -> None:
    rng = np.random.default_rng(3)
    with httpx.Client(base_url=embedded.url, timeout=60.0) as client:
        for i in range(4):
            post_patch(client, "ui-events", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), seq=i)
    first, second = _snapshots(embedded.url, 2)
    row = next(r for r in second["streams"] if r["stream_id"] == "ui-events")
    assert row["step"] == 4 and row["fixations"] == 4
    assert row["running_error"] is not None and row["repeat_error"] is not None and row["skill"] is not None
    assert second["model"]["updates_applied"] >= 1 and second["model"]["uptime_s"] > 0
    assert second["mode"] == "embedded" and second["queue_depth"] is not None
    assert first["rates"]["ticks_per_s"] is None and second["rates"]["ticks_per_s"] is not None
    assert any(s["step"] == "2" and s["repeat_error"] is not None for s in second["by_step"])

    detail = httpx.get(embedded.url + "/ui/streams/ui-events").json()
    assert [p["step"] for p in detail["series"]][-4:] == [1, 2, 3, 4]
    assert detail["series"][-4]["error"] is None  # step 1 is not scored
    assert len(detail["thumbs"]) == 4 and detail["thumbs"][-1]["png"].startswith("data:image/png;base64,")
    assert httpx.get(embedded.url + "/ui/streams/never-seen").status_code == 404


def test_feed_keeps_bounded_rings_and_forgets_deleted_streams() -> None:
    feed = LiveFeed(max_streams=2)
    patch = np.full((64, 64, 3), 200, np.uint8)
    for i in range(THUMBS_LEN + 5):
        feed.observe(["a", "b"], [patch, patch], steps=[i + 1] * 2, errors=[0.5, 0.25],
                     repeat_errors=[0.6, 0.3], seqs=[i, i])  # fmt: skip
    a = feed.detail("a")
    assert a is not None and a["fixations"] == THUMBS_LEN + 5 and len(a["thumbs"]) == THUMBS_LEN
    assert a["thumbs"][-1]["n"] == THUMBS_LEN + 5 and a["thumbs"][-1]["error"] == 0.5
    feed.observe(["c"], [patch], steps=[1], errors=[float("nan")], repeat_errors=[float("nan")], seqs=[None])
    assert feed.detail("a") is None  # the least recently fed stream went first
    feed.forget("b")
    assert feed.detail("b") is None and feed.detail("c") is not None
    import base64

    import cv2

    png = base64.b64decode(feed.detail("c")["thumbs"][0]["png"].split(",", 1)[1])  # type: ignore[index]
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (THUMB_PX, THUMB_PX, 3) and int(img[0, 0, 0]) == 200


def test_a_snapshot_lists_the_most_recent_streams_and_counts_them_all(
    embedded: ThreadedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.api.routes import ui

    rng = np.random.default_rng(4)
    with httpx.Client(base_url=embedded.url, timeout=60.0) as client:
        for sid in ("ui-cap-a", "ui-cap-b"):  # b is fed last
            post_patch(client, sid, rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    monkeypatch.setattr(ui, "MAX_ROWS", 1)
    (snap,) = _snapshots(embedded.url, 1)
    assert [r["stream_id"] for r in snap["streams"]] == ["ui-cap-b"]
    assert snap["model"]["streams"] >= 2  # the card still counts every stream of the key
