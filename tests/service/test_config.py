"""Settings: FOVEATE_* environment variables, the mapping onto ModelConfig, and refusals."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError

from learner.config import ModelConfig
from learner.errors import ConfigError
from service.config import Settings, model_fields
from tests.conftest import REPO_ROOT


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


def test_every_model_field_is_a_setting_of_its_type_default_and_doc() -> None:
    """A new ModelConfig field becomes a FOVEATE_* variable by itself (``in_features`` is the trunk's
    width, not a choice; ``preview_features`` an input the API does not carry, and
    ``preview_lr_scale`` its projection's learning rate)."""
    preview = {"preview_features", "preview_lr_scale"}
    expected = {f.name for f in dataclasses.fields(ModelConfig)} - {"in_features", *preview}
    assert set(model_fields()) == expected
    assert expected <= set(Settings.model_fields)
    types = typing.get_type_hints(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        if f.name in expected:
            setting = Settings.model_fields[f.name]
            assert (setting.annotation, setting.default) == (types[f.name], f.default), f.name
            assert setting.description, f"ModelConfig's docstring does not describe {f.name}"
    assert "2 N (K + 1)" in (Settings.model_fields["rgc_inputs"].description or "")


def test_every_model_setting_is_read_from_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    changed: dict[str, object] = {}
    for name in model_fields():
        default = getattr(ModelConfig, name)
        value = {bool: not default, int: 7, float: 0.5, str: "x"}.get(type(default), "w.pt")
        changed[name] = value
        monkeypatch.setenv(
            f"FOVEATE_{name.upper()}", str(value).lower() if isinstance(value, bool) else str(value)
        )
    s = Settings()
    assert {name: getattr(s, name) for name in model_fields()} == changed


def _settings_table() -> list[list[str]]:
    section = (REPO_ROOT / "docs" / "api.md").read_text().split("## Settings (environment variables)")[1]
    section = section.split("\n## ")[0]
    rows = [
        line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("| `FOVEATE_")
    ]
    return [[cell.strip() for cell in row] for row in rows]


def _documented(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"`{value}`"
    return f"{value:g}"


def test_the_settings_table_in_docs_api_lists_every_setting() -> None:
    documented = [re.findall(r"`(FOVEATE_[A-Z0-9_]+)`", row[0]) for row in _settings_table()]
    names = [name for row in documented for name in row]
    assert len(names) == len(set(names)), "docs/api.md lists a variable twice"
    assert set(names) == {f"FOVEATE_{name.upper()}" for name in Settings.model_fields}


def test_the_settings_table_gives_the_model_defaults() -> None:
    model = set(model_fields())
    checked = 0
    for row in _settings_table():
        names = [n.removeprefix("FOVEATE_").lower() for n in re.findall(r"`(FOVEATE_[A-Z0-9_]+)`", row[0])]
        if set(names) <= model:
            defaults = [getattr(ModelConfig, name) for name in names]
            assert row[1].split(", ") == [_documented(v) for v in defaults], f"docs/api.md: {row[0]}"
            checked += len(names)
    assert checked == len(model)


def test_defaults_equal_model_config_defaults() -> None:
    assert Settings().model_config_obj() == ModelConfig()


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="device"):
        Settings(device="tpu")
    with pytest.raises(ValidationError, match="max_batch"):
        Settings(max_batch=0)
    with pytest.raises(ConfigError, match="trunk must be one of"):
        Settings(trunk="vgg").model_config_obj()
