"""Fuzz the HTTP API from its own OpenAPI schema: every answer must be a 2xx or a 4xx, never a 5xx.

A real ``foveate serve`` (small model, API keys, checkpoints off) is started; its ``/openapi.json``
drives the requests. Each case picks an operation and then, with Hypothesis:

- path and query parameters that match the schema (:func:`from_schema`), or any text;
- a body that matches the operation's JSON schema, any JSON, random bytes, or a multipart form;
  image fields are often real PNG/JPEG patches and frames, corrupt ones, or headers claiming a huge
  size, with gaze points and patch sizes from tiny to absurd;
- a content type (JSON, text/plain, form, none) and a key (admin, a read-only key, a wrong one, none).

The run fails on the first 5xx (Hypothesis then shrinks it to a minimal request). The server's peak
resident size is read before and after (``VmHWM``), and its growth reported. ``tests/service/
test_fuzz.py`` runs 5,000 cases; more here:

    python -m bench.fuzz --cases 50000 --json runs/bench/fuzz.json
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import httpx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench._servers import FoveateProcess, start_serve


@dataclass
class Case:
    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    content: bytes | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    data: dict[str, str] | None = None


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    cases: int = 0
    seconds: float = 0.0


def _images() -> list[bytes]:
    """Real, corrupt and lying images for the image fields."""
    rng = np.random.default_rng(0)
    out = []
    for side in (8, 32, 64, 200):
        rgb = rng.integers(0, 256, (side, side + 8, 3), dtype=np.uint8)
        out.append(cv2.imencode(".png", rgb)[1].tobytes())
        out.append(cv2.imencode(".jpg", rgb)[1].tobytes())
    jpeg = bytearray(out[1])
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 20000, 20000)
    app0_end = 4 + struct.unpack(">H", jpeg[4:6])[0]
    out.append(bytes(jpeg[:app0_end] + b"\x00" + jpeg[app0_end:]))  # claims 20000 x 20000
    png = bytearray(out[0])
    png[16:24] = struct.pack(">II", 60000, 60000)  # IHDR size without a valid CRC
    out.append(bytes(png))
    out += [
        out[2][: len(out[2]) // 2],
        b"\x89PNG\r\n\x1a\n" + bytes(30),
        b"\xff\xd8\xff",
        b"GIF89a" + bytes(20),
    ]
    return out


IMAGES = _images()


def _inline(schema: Any, components: dict[str, Any], depth: int = 0) -> Any:
    """The schema with every ``$ref`` to ``#/components/schemas`` replaced by its target."""
    if depth > 20:
        return {}
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            return _inline(components[ref.rsplit("/", 1)[1]], components, depth + 1)
        return {
            k: _inline(v, components, depth + 1)
            for k, v in schema.items()
            if k not in ("examples", "example")
        }
    if isinstance(schema, list):
        return [_inline(v, components, depth + 1) for v in schema]
    return schema


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that match a JSON schema, for the subset FastAPI writes: ``type``, ``anyOf``, ``enum``,
    ``pattern``, bounds, ``properties`` (optional ones sometimes left out), ``prefixItems``, ``items``.

    >>> from_schema({"type": "integer", "minimum": 2}).example() >= 2
    True
    """
    if "anyOf" in schema:
        return st.one_of([from_schema(s) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(min_value=schema.get("minimum"), max_value=schema.get("maximum"))
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        return st.floats(min_value=low, exclude_min="exclusiveMinimum" in schema, allow_nan=False,
                         allow_infinity=False)  # fmt: skip
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(max_size=schema.get("maxLength", 40))
    if kind == "array":
        if "prefixItems" in schema:
            return st.tuples(*(from_schema(s) for s in schema["prefixItems"])).map(list)
        return st.lists(from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0), max_size=5)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: from_schema(v) for k, v in props.items() if k in required},
            optional={k: from_schema(v) for k, v in props.items() if k not in required},
        )
    return _JSON


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_NUMBER = st.one_of(
    st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.sampled_from([0, 1, 2, 64, 20000, 2**31])
)


_GAZE = st.one_of(st.integers(0, 300), st.floats(0, 300), _NUMBER)
_SIZE = st.one_of(st.sampled_from([2, 16, 64, 257, 1025, 20000, 2**31]), _NUMBER)


def _image_fields() -> st.SearchStrategy[dict[str, Any]]:
    real = st.sampled_from(IMAGES).map(lambda b: base64.b64encode(b).decode())
    b64 = st.one_of(real, real, real, st.text(max_size=40))
    raw = st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from([1, 3, 4])).map(
        lambda s: {"raw_b64": base64.b64encode(bytes(s[0] * s[1] * 3)).decode(), "shape": list(s)}
    )
    frame = st.fixed_dictionaries(
        {"frame_b64": b64, "x": _GAZE, "y": _GAZE, "size_px": _SIZE},
        optional={"size_deg": _NUMBER, "px_per_deg": _NUMBER},
    ) | st.fixed_dictionaries(
        {"frame_b64": b64, "x": _GAZE, "y": _GAZE, "size_deg": _NUMBER, "px_per_deg": _NUMBER}
    )
    extra = st.fixed_dictionaries(
        {}, optional={"seq": _NUMBER, "t": _NUMBER, "duration_ms": _NUMBER, "reset": st.booleans()}
    )
    image = st.one_of(b64.map(lambda v: {"patch_b64": v}), raw, frame, frame, frame)
    return st.builds(lambda a, b: {**a, **b}, image, extra)


class Fuzzer:
    """Request strategies for every operation of an OpenAPI document (see the module docstring)."""

    def __init__(self, openapi: dict[str, Any], keys: dict[str, str]) -> None:
        self.components = openapi.get("components", {}).get("schemas", {})
        self.keys = keys
        self.operations = [
            (method.upper(), path, op)
            for path, item in openapi["paths"].items()
            for method, op in item.items()
            if method in ("get", "post", "delete", "put", "patch")
        ]

    def _param(self, param: dict[str, Any]) -> st.SearchStrategy[str]:
        schema = _inline(param.get("schema", {}), self.components)
        typed = from_schema(schema).map(lambda v: json.dumps(v) if not isinstance(v, str) else v)
        lying = st.text(max_size=140) | st.sampled_from(["rig1", "x" * 129, "../../etc", "%00", "a b", "é"])
        return typed.map(lambda v: v.lower() if v in ("True", "False") else v) | lying

    def _body(self, op: dict[str, Any]) -> st.SearchStrategy[tuple[bytes | None, str | None, Any]]:
        content = op.get("requestBody", {}).get("content", {})
        options: list[st.SearchStrategy[tuple[bytes | None, str | None, Any]]] = [
            st.just((None, None, None)),
            st.binary(max_size=200).map(lambda b: (b, "application/json", None)),
            _JSON.map(lambda v: (json.dumps(v).encode(), "application/json", None)),
            _JSON.map(lambda v: (json.dumps(v).encode(), "text/plain", None)),
        ]
        if "application/json" in content:
            schema = _inline(content["application/json"].get("schema", {}), self.components)
            typed = from_schema(schema) if schema else _JSON
            options.append(typed.map(lambda v: (json.dumps(v).encode(), "application/json", None)))
            if "fixations" in json.dumps(schema) and "stream_id" in json.dumps(schema):
                item = st.builds(
                    lambda f, s: {**f, "stream_id": s}, _image_fields(), st.sampled_from(["a", "b", "c:d"])
                )
                batch = st.lists(item, min_size=0, max_size=6).map(lambda xs: {"fixations": xs})
                options.append(batch.map(lambda v: (json.dumps(v).encode(), "application/json", None)))
            elif "patch_b64" in json.dumps(schema):
                options.append(
                    _image_fields().map(lambda v: (json.dumps(v).encode(), "application/json", None))
                )
        if "multipart/form-data" in content:
            part = st.sampled_from(["patch", "frame", "raw", "other"])
            fields = {"x": _GAZE.map(str), "y": _GAZE.map(str), "size_px": _SIZE.map(str),
                      "shape": st.sampled_from(["8,8,3", "1,1,1", "99999,99999,3"])}  # fmt: skip
            form = st.fixed_dictionaries({"part": part, "image": st.sampled_from(IMAGES)}, optional=fields)
            options.append(form.map(lambda f: (None, "multipart", f)))
        return st.one_of(options)

    def cases(self) -> st.SearchStrategy[Case]:
        # The routes that decode images do the most work: they get more of the cases.
        weighted = [op for op in self.operations for _ in range(4 if "fixations" in op[1] else 1)]
        return st.sampled_from(weighted).flatmap(self._case)

    def _case(self, operation: tuple[str, str, dict[str, Any]]) -> st.SearchStrategy[Case]:
        method, template, op = operation
        params = op.get("parameters", [])
        path_params = {p["name"]: self._param(p) for p in params if p["in"] == "path"}
        query = {p["name"]: self._param(p) for p in params if p["in"] == "query"}
        who = st.sampled_from([*self.keys, *self.keys, "wrong", "none"])

        def build(path_values: dict[str, str], query_values: dict[str, str], body: Any, key: str) -> Case:
            path = template
            for name, value in path_values.items():
                path = path.replace("{" + name + "}", quote(value, safe="") or "x")
            headers = {}
            if key == "wrong":
                headers["Authorization"] = "Bearer fov_00000000_" + "z" * 43
            elif key != "none":
                headers["Authorization"] = f"Bearer {self.keys[key]}"
            content, ctype, form = body
            if ctype == "multipart":
                files = {form["part"]: ("image", form["image"], "application/octet-stream")}
                data = {k: v for k, v in form.items() if k not in ("part", "image")}
                return Case(method, path, query_values, headers, files=files, data=data)
            if ctype is not None:
                headers["Content-Type"] = ctype
            return Case(method, path, query_values, headers, content=content)

        return st.builds(
            build,
            st.fixed_dictionaries(path_params),
            st.fixed_dictionaries({}, optional=query),
            self._body(op) if method in ("POST", "PUT", "PATCH") else st.just((None, None, None)),
            who,
        )


def peak_rss(pid: int) -> int:
    """A process's peak resident set size, bytes (``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def fuzz(url: str, keys: dict[str, str], cases: int, seed: int = 0) -> Tally:
    """Send ``cases`` generated requests to the server at ``url``; raises AssertionError on a 5xx."""
    with httpx.Client(base_url=url, timeout=120.0) as client:
        fuzzer = Fuzzer(client.get("/openapi.json").json(), keys)
        tally = Tally()
        start = time.monotonic()

        @settings(max_examples=cases, derandomize=True, database=None, deadline=None, print_blob=False,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(fuzzer.cases())
        def one(case: Case) -> None:
            r = client.request(case.method, case.path, params=case.params, headers=case.headers,
                               content=case.content, files=case.files, data=case.data)  # fmt: skip
            tally.cases += 1
            tally.statuses[r.status_code] += 1
            assert r.status_code < 500, (
                f"{case.method} {case.path} {case.params} -> {r.status_code} {r.text[:300]}"
            )

        one()
        tally.seconds = time.monotonic() - start
    return tally


#: The server's settings for a fuzz run: small model, small limits, keys from the caller.
SERVER_ENV = {
    "FOVEATE_N_UNITS": "64",
    "FOVEATE_EMBED_DIM": "16",
    "FOVEATE_PRED_HIDDEN": "32",
    "FOVEATE_INPUT_SIZE": "32",
    "FOVEATE_LOSS": "cosine",
    "FOVEATE_DEVICE": "cpu",
    "FOVEATE_CHECKPOINT_PATH": "",
    "FOVEATE_REDIS_URL": "",
    "FOVEATE_MAX_PIXELS": str(1024 * 1024),
    "FOVEATE_MAX_BODY_BYTES": str(2 * 1024 * 1024),
    "FOVEATE_MAX_PATCH_PX": "256",
    "FOVEATE_SYNC_TIMEOUT_S": "60",
    "FOVEATE_LOG_LEVEL": "WARNING",
    "OMP_NUM_THREADS": "1",
}


def start_fuzz_server(workdir: Path) -> tuple[FoveateProcess, dict[str, str]]:
    """``foveate serve`` with an admin and a read-only key; returns it and the keys."""
    from service.auth import new_key

    admin, admin_key = new_key("fuzz", {"admin"})
    reader, reader_key = new_key("fuzz", {"read"})
    env = {**SERVER_ENV, "FOVEATE_API_KEYS": f"{admin_key.line()};{reader_key.line()}"}
    proc = start_serve(workdir, env)
    # the readiness probe of start_serve is /readyz (open by default): the server is up
    return proc, {"admin": admin, "admin2": admin, "reader": reader}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=20000, help="requests to generate (default 20000)")
    ap.add_argument("--json", type=Path, help="write the tally here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        proc, keys = start_fuzz_server(Path(tmp))
        try:
            before = peak_rss(proc.process.pid)
            tally = fuzz(proc.url, keys, args.cases)
            grown = peak_rss(proc.process.pid) - before
        finally:
            proc.stop()
    report = {
        "cases": tally.cases,
        "seconds": round(tally.seconds, 1),
        "statuses": dict(sorted(tally.statuses.items())),
        "peak_rss_growth_mb": round(grown / 2**20, 1),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
