"""Hostile input against a real ``foveate serve`` subprocess: it answers 4xx and its memory stays flat.

The memory checks read the server's peak resident size (``VmHWM`` in ``/proc/PID/status``) before and
after an attack, so a brief allocation between two polls cannot hide. The attacks are the two of
issue 12: a small frame with ``size_px=20000`` (a 20000 x 20000 patch, 1.2 GB), and a JPEG whose
header claims 20000 x 20000 behind a stray byte after its APP0 segment (libjpeg skips the byte, a
hand-written header parser gave up and let the full decode happen).

The connection tests use raw sockets: slow or oversized headers, a chunked body over the limit, a
body that stops arriving, a client that hangs up mid-body.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from tests.service._support import ServiceProcess, free_port, png, scrape

pytestmark = pytest.mark.slow  # one server process (torch) for the module

MB = 1024 * 1024
LIMITS = {
    "FOVEATE_HEADER_TIMEOUT_S": "1",
    "FOVEATE_BODY_TIMEOUT_S": "2",
    "FOVEATE_MAX_BODY_BYTES": str(2 * MB),
    "FOVEATE_MAX_HEADER_BYTES": "16384",
    "FOVEATE_CORS_ORIGINS": "https://lab.example",
    "FOVEATE_REDIS_URL": "",
    "FOVEATE_CHECKPOINT_PATH": "",
}


class Server:
    def __init__(self, proc: ServiceProcess, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def peak_rss(self) -> int:
        """The process's peak resident set size so far, bytes."""
        status = Path(f"/proc/{self.proc.process.pid}/status").read_text()
        (line,) = [x for x in status.splitlines() if x.startswith("VmHWM:")]
        return int(line.split()[1]) * 1024

    def raw(self, data: bytes, *, wait: float = 30.0) -> bytes:
        """Send bytes on a fresh connection and read until the server closes it (or ``wait`` s)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=wait) as sock:
            sock.sendall(data)
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("hostile") / "serve.log"
    proc = ServiceProcess(["serve", "--port", str(port)], LIMITS, log)
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/readyz")
        server = Server(proc, port)
        frame = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
        body = {"frame_b64": base64.b64encode(png(frame)).decode(), "x": 80, "y": 60, "size_px": 64}
        for _ in range(3):  # warm up: the model's first ticks, the decoder's first frames
            assert (
                httpx.post(f"{server.url}/v1/streams/warm/fixations", json=body, timeout=60).status_code
                == 200
            )
        yield server
    finally:
        proc.stop()


def _jpeg_hiding_its_size(side: int = 20000) -> bytes:
    """A small JPEG whose frame header says side x side, with a stray byte after APP0."""
    ok, enc = cv2.imencode(".jpg", np.full((16, 16, 3), 90, np.uint8))
    assert ok
    data = bytearray(enc.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)  # height, width
    app0_end = 2 + 2 + struct.unpack(">H", data[4:6])[0]
    return bytes(data[:app0_end] + b"\x00" + data[app0_end:])


def _post_all(url: str, bodies: list[dict[str, object]]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: httpx.post(url, json=b, timeout=120), bodies))


def test_a_huge_patch_size_is_refused_before_any_allocation(server: Server) -> None:
    frame = base64.b64encode(png(np.zeros((100, 100, 3), np.uint8))).decode()
    url = f"{server.url}/v1/streams/attack/fixations"
    before = server.peak_rss()
    answers = _post_all(url, [{"frame_b64": frame, "x": 50, "y": 50, "size_px": 20000}] * 4)
    gaze = {"frame_b64": frame, "x": 50, "y": 50}
    answers += _post_all(url, [{**gaze, "size_px": 2147483648}, {**gaze, "size_deg": 1e6, "px_per_deg": 1e6}])
    grown = server.peak_rss() - before
    for r in answers:
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "PatchError" and "FOVEATE_MAX_PATCH_PX" in r.json()["detail"]
    assert grown < 100 * MB, f"peak RSS grew by {grown / MB:.0f} MB"


def test_a_jpeg_hiding_its_size_is_refused_from_its_header(server: Server) -> None:
    jpeg = base64.b64encode(_jpeg_hiding_its_size()).decode()
    before = server.peak_rss()
    bodies: list[dict[str, object]] = [{"frame_b64": jpeg, "x": 5, "y": 5, "size_px": 32}] * 3
    bodies.append({"patch_b64": jpeg})
    answers = _post_all(f"{server.url}/v1/streams/attack/fixations", bodies)
    grown = server.peak_rss() - before
    for r in answers:
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "PatchError" and "pixels" in r.json()["detail"]
    assert grown < 100 * MB, f"peak RSS grew by {grown / MB:.0f} MB"


def test_slow_headers_are_cut_off(server: Server) -> None:
    # 40 connections that never finish their headers: each is answered 408 and closed by the server
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(40)]
    try:
        for sock in socks:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        for sock in socks:
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    finally:
        for sock in socks:
            sock.close()
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # the server still answers


def test_oversized_headers_get_431(server: Server) -> None:
    answer = server.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert answer.split(b"\r\n", 1)[0] in (b"HTTP/1.1 431 Request Header Fields Too Large",)


def test_a_chunked_body_over_the_limit_is_413(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"fixations": [{"stream_id": "c", "patch_b64": "'
        for _ in range(3):
            yield b"A" * MB
        yield b'"}]}'

    for path in ("/v1/fixations/batch", "/v1/streams/c/fixations"):
        r = httpx.post(server.url + path, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.json()["error"] == "PayloadTooLarge" and "FOVEATE_MAX_BODY_BYTES" in r.json()["detail"]


def test_a_body_that_stops_arriving_is_408(server: Server) -> None:
    head = (b"POST /v1/streams/slow/fixations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"patch_b64\": ")  # fmt: skip
    answer = server.raw(head)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"FOVEATE_BODY_TIMEOUT_S" in answer


HANGING_UP = (
    b"POST /v1/streams/gone/fixations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b'Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"patch'
)


def test_a_client_hanging_up_mid_body_is_no_server_error(server: Server) -> None:
    before = scrape(server.url + "/metrics")
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(HANGING_UP)
    # a request after them is answered in order on the event loop, so theirs are finished by then
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the disconnects are noticed when the server next reads
        after = scrape(server.url + "/metrics")
        counted = [v for (name, labels), v in after.items()
                   if name == "foveate_http_requests_total" and ("status", "499") in labels]  # fmt: skip
        if sum(counted) >= 3:
            break
        time.sleep(0.1)
    errors = {
        k: v for k, v in after.items() if k[0] == "foveate_http_requests_total" and ("status", "500") in k[1]
    }
    assert errors == {k: v for k, v in before.items() if k in errors}, "a disconnect was counted as a 500"
    assert sum(counted) >= 3
    log = server.proc.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log, server.proc.tail()


def test_browsers_cannot_change_state_cross_origin(server: Server) -> None:
    body = json.dumps({"raw_b64": base64.b64encode(bytes(8 * 8 * 3)).decode(), "shape": [8, 8, 3]})
    url = f"{server.url}/v1/streams/csrf/fixations"
    # what a web page can send without a preflight: text/plain JSON, from its own origin
    evil = httpx.post(
        url, content=body, headers={"content-type": "text/plain", "origin": "https://evil.example"}
    )
    assert evil.status_code == 403 and evil.json()["error"] == "Forbidden"
    plain = httpx.post(url, content=body, headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and "application/json" in plain.json()["detail"]
    form = httpx.post(url, data={"seq": "1"}, headers={"origin": "null"})
    assert form.status_code == 403
    bodiless = httpx.post(f"{server.url}/v1/model/checkpoint")
    assert bodiless.status_code == 415 and "{}" in bodiless.json()["detail"]
    bodiless = httpx.post(f"{server.url}/v1/streams/warm/reset")
    assert bodiless.status_code == 415
    gone = httpx.delete(f"{server.url}/v1/streams/warm", headers={"origin": "https://evil.example"})
    assert gone.status_code == 403
    # the same request with JSON from an allowed origin, and the CORS preflight for it
    ok = httpx.post(
        url, content=body, headers={"content-type": "application/json", "origin": "https://lab.example"}
    )
    assert ok.status_code == 200, ok.text
    asking = {"access-control-request-method": "POST", "access-control-request-headers": "content-type"}
    pre = httpx.options(url, headers={"origin": "https://lab.example", **asking})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://lab.example"
    pre = httpx.options(
        url, headers={"origin": "https://evil.example", "access-control-request-method": "POST"}
    )
    assert "access-control-allow-origin" not in pre.headers
    assert httpx.get(f"{server.url}/v1/streams").headers.get("access-control-allow-origin") is None
