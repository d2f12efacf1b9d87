"""Tests for learner.trunk: the frozen ResNet of areas 1-5 and how its weights are loaded."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from learner.errors import ConfigError, InputError, TrunkWeightsError
from learner.trunk import Trunk, build_trunk

RESNET18_FILE = "resnet18-f37072fd.pth"  # the file name in ResNet18_Weights.IMAGENET1K_V1's url


@pytest.fixture(scope="module")
def ref() -> Trunk:
    return build_trunk("resnet18", None, seed=7)


@pytest.fixture(scope="module")
def patches() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # (B, 3, P, P)


@pytest.fixture
def saved_sd(ref: Trunk, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The reference trunk's weights as a full torchvision state dict, classifier included."""
    sd = {k: v.clone() for k, v in ref.body.state_dict().items()}
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    return sd


def test_resnet18_features(ref: Trunk, patches: torch.Tensor) -> None:
    out = ref(patches)
    assert ref.out_features == 512 and out.shape == (3, 512)
    assert torch.isfinite(out).all() and not out.requires_grad
    assert ref.source == "random(seed=7)"


def test_resnet50_width() -> None:
    trunk = build_trunk("resnet50", None, seed=0)
    assert trunk.out_features == 2048 and trunk(torch.zeros(1, 3, 32, 32)).shape == (1, 2048)


def test_same_seed_same_weights_different_seed_different(ref: Trunk) -> None:
    again, other = build_trunk("resnet18", None, seed=7), build_trunk("resnet18", None, seed=8)
    for key, value in ref.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert not torch.equal(ref.state_dict()["body.conv1.weight"], other.state_dict()["body.conv1.weight"])


def test_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build_trunk("resnet18", None, seed=5)
    assert torch.equal(torch.get_rng_state(), before)


def test_frozen_and_stays_in_eval(ref: Trunk, patches: torch.Tensor) -> None:
    assert all(not p.requires_grad for p in ref.parameters())
    assert ref.train() is ref
    assert not any(m.training for m in ref.modules())
    # BatchNorm on running statistics: a patch's features do not depend on its batch mates.
    torch.testing.assert_close(ref(patches)[:1], ref(patches[:1]), rtol=1e-5, atol=1e-5)


def test_random_trunk_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="learner.trunk"):
        build_trunk("resnet18", None, seed=3)
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert any("RANDOM" in m and "seed 3" in m for m in warnings)
    assert "trunk_weights" in caplog.text


def test_round_trip_plain_state_dict(
    ref: Trunk,
    patches: torch.Tensor,
    saved_sd: dict[str, torch.Tensor],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "plain.pth"
    torch.save(saved_sd, path)
    with caplog.at_level(logging.INFO, logger="learner.trunk"):
        loaded = build_trunk("resnet18", str(path), seed=0)
    assert str(path) in caplog.text and loaded.source == str(path)
    assert torch.equal(loaded(patches), ref(patches))
    assert not torch.equal(build_trunk("resnet18", None, seed=0)(patches), ref(patches))  # the load mattered


def test_round_trip_simsiam_checkpoint(
    ref: Trunk, patches: torch.Tensor, saved_sd: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    wrapped = {"module.encoder." + k: v for k, v in saved_sd.items() if not k.startswith("fc.")}
    wrapped["module.encoder.fc.weight"] = torch.randn(2048, 512)  # SimSiam's projector lives in encoder.fc
    wrapped["module.predictor.0.weight"] = torch.randn(512, 2048)
    path = tmp_path / "simsiam.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": wrapped}, path)
    assert torch.equal(build_trunk("resnet18", str(path))(patches), ref(patches))


def test_round_trip_moco_checkpoint_takes_query_encoder(
    ref: Trunk, patches: torch.Tensor, saved_sd: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    other = build_trunk("resnet18", None, seed=99).body.state_dict()
    model = {"module.encoder_q." + k: v for k, v in saved_sd.items()}
    model |= {"module.encoder_k." + k: v for k, v in other.items()}
    model["module.queue"] = torch.randn(128, 16)
    path = tmp_path / "moco.pth"
    torch.save({"model": model}, path)
    assert torch.equal(build_trunk("resnet18", str(path))(patches), ref(patches))


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(TrunkWeightsError, match=r"not found: .*nope\.pth"):
        build_trunk("resnet18", str(tmp_path / "nope.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 definitely not a checkpoint " * 20)
    with pytest.raises(TrunkWeightsError, match=r"cannot read .*garbage\.pth"):
        build_trunk("resnet18", str(garbage))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(TrunkWeightsError, match=r"empty\.pth"):
        build_trunk("resnet18", str(empty))
    with pytest.raises(TrunkWeightsError, match="not a file"):
        build_trunk("resnet18", str(tmp_path))


class _Payload:
    """An arbitrary object: a weights_only load must refuse to unpickle it."""


def test_arbitrary_objects_are_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "pickle.pth"
    torch.save({"state_dict": {"conv1.weight": _Payload()}}, path)
    with pytest.raises(TrunkWeightsError, match="cannot read"):
        build_trunk("resnet18", str(path))
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(TrunkWeightsError, match="not a state dict"):
        build_trunk("resnet18", str(tensor_only))


def test_resnet50_weights_refused_by_resnet18(tmp_path: Path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(build_trunk("resnet50", None).body.state_dict(), path)
    with pytest.raises(TrunkWeightsError, match=r"r50.pth does not match resnet18") as info:
        build_trunk("resnet18", str(path))
    assert "unexpected (layer1.0.conv3.weight" in str(info.value)
    assert "mis-shaped (layer1.0.conv1.weight (64, 64, 1, 1) in file vs (64, 64, 3, 3)" in str(info.value)


def test_missing_key_is_named(saved_sd: dict[str, torch.Tensor], tmp_path: Path) -> None:
    del saved_sd["layer3.1.bn2.running_var"]
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": {"module.backbone." + k: v for k, v in saved_sd.items()}}, path)
    with pytest.raises(TrunkWeightsError, match=r"1 missing \(layer3.1.bn2.running_var\)"):
        build_trunk("resnet18", str(path))


def test_weights_name_read_only_from_local_cache(
    ref: Trunk,
    patches: torch.Tensor,
    saved_sd: dict[str, torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(TrunkWeightsError, match=f"not in the local torch cache.*{RESNET18_FILE}.*network"):
        build_trunk("resnet18", "ResNet18_Weights.IMAGENET1K_V1")
    assert not (tmp_path / "hub" / "checkpoints" / RESNET18_FILE).exists()  # nothing was downloaded
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(saved_sd, tmp_path / "hub" / "checkpoints" / RESNET18_FILE)
    assert torch.equal(build_trunk("resnet18", "ResNet18_Weights.DEFAULT")(patches), ref(patches))


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("ResNet18_Weights.NOPE", "unknown torchvision weights"),
        ("ResNet50_Weights.IMAGENET1K_V1", "not for resnet18"),
    ],
)
def test_bad_weights_names(weights: str, message: str) -> None:
    with pytest.raises(TrunkWeightsError, match=message):
        build_trunk("resnet18", weights)


def test_identity_trunk() -> None:
    trunk = build_trunk("none", None, in_features=16)
    x = torch.randn(4, 16)
    assert trunk.out_features == 16 and trunk(x) is x
    with pytest.raises(InputError, match=r"\(B, 16\)"):
        trunk(torch.randn(4, 8))


@pytest.mark.parametrize(
    ("name", "weights", "in_features", "message"),
    [
        ("resnet101", None, None, "trunk must be one of"),
        ("none", None, None, "needs in_features"),
        ("none", "x.pth", 8, "no weights"),
        ("resnet18", None, 2048, "gives 512 features"),
    ],
)
def test_config_errors(name: str, weights: str | None, in_features: int | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_trunk(name, weights, in_features=in_features)


def test_resnet_refuses_wrong_input_shape(ref: Trunk) -> None:
    with pytest.raises(InputError, match=r"\(B, 3, P, P\)"):
        ref(torch.zeros(2, 512))
