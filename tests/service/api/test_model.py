"""/v1/model: configuration and counters; on-demand checkpoints."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx

from learner.checkpoint import read_state
from tests.service._support import Scanpath, ThreadedServer, png


def test_model_info_and_checkpoint(embedded: ThreadedServer, osie: list[Scanpath]) -> None:
    client = httpx.Client(base_url=embedded.url, timeout=60.0)
    # three fixations: a fresh model learns nothing from a stream's first scored one (ill-conditioned)
    for patch in osie[0].patches[:3]:
        r = client.post(
            "/v1/streams/model-test/fixations", json={"patch_b64": base64.b64encode(png(patch)).decode()}
        )
        assert r.status_code == 200
    info = client.get("/v1/model").json()
    assert info["learner"] == "rfp" and info["device"] == "cpu"
    assert (info["config"]["n_units"], info["config"]["embed_dim"], info["config"]["input_size"]) == (
        64,
        16,
        32,
    )
    assert set(info["parameters"]) == {"trunk", "rgc", "embedding", "predictor"}
    assert 0 < info["trainable_parameters"] < info["parameters"]["trunk"]  # the trunk is frozen
    assert info["updates_applied"] >= 1 and info["streams"] >= 1 and info["bytes_per_stream"] > 0

    ckpt = client.post("/v1/model/checkpoint", json={}).json()
    path = Path(ckpt["path"])
    assert path.exists() and ckpt["updates_applied"] == info["updates_applied"]
    saved = read_state(path)
    assert "model-test" in saved["extra"]["service"]["records"] and "model-test" in saved["state"]["streams"]
    assert ckpt["bytes"] >= ckpt["bytes_written"] > 0 and ckpt["stall_seconds"] >= 0
    assert client.get("/v1/model").json()["last_checkpoint"]["written_at"] == ckpt["written_at"]
