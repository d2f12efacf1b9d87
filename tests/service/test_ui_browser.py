"""The live page (``GET /``) and the offline ``/docs`` in a real browser: Debian's headless Chromium,
driven by Playwright (``executable_path``: no browser download), against a real ``foveate serve``
subprocess fed with OSIE scanpaths over HTTP.

Every wait is for a condition in the page or the API, with a generous timeout; no sleep decides a
result. The page's screenshot is saved under the test's tmp dir and its path printed (``pytest -s``).
Skipped, with the reason, when Chromium (scripts/install-deploy-tools.sh installs it) or the
``playwright`` package (the ``test`` extra) is missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.service._support import REPO_ROOT, Scanpath, ServiceProcess, free_port, post_patch

CHROMIUM = os.environ.get("FOVEATE_CHROMIUM", "/usr/bin/chromium")
# As root in a sandbox with no network but the registries: no sandbox, no GPU, no background traffic.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
WAIT_MS = 60_000  # a loaded 2-core machine can take seconds for a first tick

sync_api = pytest.importorskip("playwright.sync_api", reason="no `playwright` package (the test extra)")
if not (shutil.which(CHROMIUM) or os.path.exists(CHROMIUM)):
    pytest.skip(f"no Chromium at {CHROMIUM}: run scripts/install-deploy-tools.sh (apt-get install chromium)",
                allow_module_level=True)  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """``foveate serve`` (small model, no checkpoints) on a free port of 127.0.0.1."""
    port = free_port()
    log = tmp_path_factory.mktemp("ui") / "serve.log"
    proc = ServiceProcess(["serve", "--host", "127.0.0.1", "--port", str(port)],
                          {"FOVEATE_CHECKPOINT_PATH": ""}, log)  # fmt: skip
    proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        proc.wait_http(f"{proc.url}/readyz")  # type: ignore[attr-defined]
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


class _Page:
    """A fresh page that records console errors, page errors and requests to any other host."""

    def __init__(self, browser: Any, base: str) -> None:
        self.context = browser.new_context(viewport={"width": 1440, "height": 1000})
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.errors: list[str] = []
        self.foreign: list[str] = []
        host = urlsplit(base).netloc
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))

        def offline(route: Any) -> None:  # the lab machine is offline: nothing may leave 127.0.0.1
            url = route.request.url
            if urlsplit(url).netloc == host or url.startswith("data:"):
                route.continue_()
            else:
                self.foreign.append(url)
                route.abort()

        self.page.route("**/*", offline)

    def close(self) -> None:
        self.context.close()


def _post_path(client: httpx.Client, stream: str, path: Scanpath, start_seq: int = 0) -> None:
    for i, patch in enumerate(path.patches):
        post_patch(client, stream, patch, seq=start_seq + i, reset=i == 0 and start_seq == 0)


def test_live_page_follows_a_replay_and_resets_a_stream(
    server: Any, browser: Any, osie: list[Scanpath], tmp_path: Path
) -> None:
    ui = _Page(browser, server.url)
    page = ui.page
    with httpx.Client(base_url=server.url, timeout=120.0) as client:
        _post_path(client, "osie-1001-s1", osie[0])  # the first fixations arrive before the page opens
        page.goto(f"{server.url}/")

        # the model and the stream appear from the event stream
        row = page.locator('#streams tbody tr[data-stream="osie-1001-s1"]')
        row.wait_for()
        sync_api.expect(page.locator("#m-trunk")).not_to_have_text("–")
        sync_api.expect(page.locator("#conn-text")).to_have_text("live")
        n = len(osie[0].patches)
        sync_api.expect(row.locator(".fix")).to_have_text(str(n))
        # the error chart of the followed stream: scored fixations are steps 2..n
        chart = page.locator("#chart-stream")
        sync_api.expect(chart).to_have_attribute("data-n", str(n - 1))
        sync_api.expect(page.locator("#thumbs img")).to_have_count(min(n, 16))
        sync_api.expect(page.locator("#chart-step")).not_to_have_attribute("data-n", "0")

        # more fixations arrive: the table, the chart and the thumbnails follow without a reload
        snapshots_before = int(page.locator("body").get_attribute("data-snapshots") or 0)
        _post_path(client, "osie-1001-s1", osie[1], start_seq=n)
        m = n + len(osie[1].patches)
        sync_api.expect(row.locator(".fix")).to_have_text(str(m))
        sync_api.expect(chart).to_have_attribute("data-n", str(m - 1))
        sync_api.expect(page.locator("#thumbs img")).to_have_count(min(m, 16))
        assert int(page.locator("body").get_attribute("data-snapshots") or 0) > snapshots_before
        _post_path(client, "osie-1002-s1", osie[2])
        page.locator('#streams tbody tr[data-stream="osie-1002-s1"]').wait_for()

        # a test artifact that outlives pytest's temporary folders (runs/ is git-ignored)
        screenshot = (
            Path(os.environ.get("FOVEATE_ARTIFACTS", REPO_ROOT / "runs" / "artifacts")) / "foveate-ui.png"
        )
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        print(f"\nscreenshot of the live page: {screenshot}")
        assert screenshot.stat().st_size > 10_000

        # reset: Cancel leaves the stream alone, Confirm resets it (checked through the API)
        assert client.get("/v1/streams/osie-1001-s1").json()["step"] == m
        row.locator('button[data-op="reset"]').click()
        dialog = page.locator("#confirm")
        sync_api.expect(dialog).to_be_visible()
        page.locator("#confirm-cancel").click()
        sync_api.expect(dialog).to_be_hidden()
        assert client.get("/v1/streams/osie-1001-s1").json()["step"] == m
        row.locator('button[data-op="reset"]').click()
        page.locator("#confirm-ok").click()
        sync_api.expect(page.locator(".toast")).to_contain_text("reset")
        assert client.get("/v1/streams/osie-1001-s1").json()["step"] == 0
        sync_api.expect(row.locator(".step")).to_have_text("0")

        # delete
        other = page.locator('#streams tbody tr[data-stream="osie-1002-s1"]')
        other.locator('button[data-op="delete"]').click()
        page.locator("#confirm-ok").click()
        sync_api.expect(other).to_have_count(0)
        assert client.get("/v1/streams/osie-1002-s1").status_code == 404

    ui.close()
    assert ui.errors == [], ui.errors
    assert ui.foreign == [], ui.foreign


def test_swagger_ui_works_offline(server: Any, browser: Any) -> None:
    ui = _Page(browser, server.url)
    page = ui.page
    page.goto(f"{server.url}/docs")
    sync_api.expect(page.locator(".swagger-ui .info .title")).to_contain_text("foveate")
    page.locator(".opblock").first.wait_for()
    assert page.locator(".opblock").count() >= 8  # every route of /openapi.json, drawn
    ui.close()
    assert ui.foreign == [], f"/docs reached outside 127.0.0.1: {ui.foreign}"
    assert ui.errors == [], ui.errors
