"""Settings: FOVEATE_* environment variables, the mapping onto ModelConfig, and refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydantic import ValidationError

from learner.config import ModelConfig
from learner.errors import ConfigError
from service.config import Settings, model_fields


def test_env_variables_fill_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOVEATE_N_UNITS", "64")
    monkeypatch.setenv("FOVEATE_LR", "0.05")
    monkeypatch.setenv("FOVEATE_DEVICE", "cpu")
    monkeypatch.setenv("FOVEATE_MAX_BATCH", "8")
    monkeypatch.setenv("FOVEATE_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("FOVEATE_CHECKPOINT_PATH", "/tmp/x.pt")
    s = Settings()
    assert (s.n_units, s.lr, s.device, s.max_batch) == (64, 0.05, "cpu", 8)
    assert s.redis_url == "redis://127.0.0.1:1/0" and not s.embedded
    assert s.checkpoint_path == Path("/tmp/x.pt")


def test_empty_redis_url_means_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOVEATE_REDIS_URL", "")
    monkeypatch.setenv("FOVEATE_CHECKPOINT_PATH", "")
    s = Settings()
    assert s.embedded and s.redis_url is None and s.checkpoint_path is None


def test_model_fields_map_onto_model_config() -> None:
    s = Settings(n_units=32, embed_dim=8, pred_hidden=16, input_size=48, trunk="resnet34", seed=3, loss="mse")
    cfg = s.model_config_obj()
    assert isinstance(cfg, ModelConfig)
    assert (cfg.n_units, cfg.embed_dim, cfg.pred_hidden, cfg.input_size, cfg.trunk, cfg.seed, cfg.loss) == (
        32,
        8,
        16,
        48,
        "resnet34",
        3,
        "mse",
    )
    for name in model_fields():  # every mapped field exists on both sides with the same value
        assert getattr(cfg, name) == getattr(s, name)


def test_every_model_field_is_a_setting() -> None:
    """A new ModelConfig field that is not passed through would never become a FOVEATE_* variable
    (``in_features`` is the trunk's width, not a choice)."""
    assert set(model_fields()) == {f.name for f in dataclasses.fields(ModelConfig)} - {"in_features"}


def test_defaults_equal_model_config_defaults() -> None:
    assert Settings().model_config_obj() == ModelConfig()


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="device"):
        Settings(device="tpu")
    with pytest.raises(ValidationError, match="max_batch"):
        Settings(max_batch=0)
    with pytest.raises(ConfigError, match="trunk must be one of"):
        Settings(trunk="vgg").model_config_obj()
