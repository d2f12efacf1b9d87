"""Areas 1-5: a frozen torchvision ResNet that turns a patch into one pooled feature vector.

The trunk is the stem and ``layer1`` ... ``layer4`` of a ResNet, followed by global average
pooling; the classifier ``fc`` is not part of it. It never learns: every parameter is frozen
and it stays in eval mode, so BatchNorm always uses its running statistics and a patch's
features do not depend on the other patches in the tick.

Weights come from one of three places, chosen by ``weights``:

- ``None``: random, seeded by ``seed`` (a WARNING says so: fine for tests and plumbing, not
  for science);
- a file path: a torchvision state dict, or a self-supervised checkpoint (SimSiam, MoCo, ...)
  whose ResNet keys carry a prefix such as ``module.encoder.``;
- a torchvision weights name such as ``ResNet50_Weights.IMAGENET1K_V2``, read from the local
  torch hub cache only: foveate never downloads at run time.

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

from learner.errors import ConfigError, InputError, TrunkWeightsError

log = logging.getLogger(__name__)

#: Trunk names and the width M of their pooled features.
RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}

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
        ``resnet18``, ``resnet34``, ``resnet50`` or ``none``.
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
        features: torch.Tensor = self.body(x)  # (B, 3, P, P) -> (B, M): the ResNet's fc is an Identity
        return features

    def extra_repr(self) -> str:
        return f"name={self.name}, out_features={self.out_features}, source={self.source}"


def build_trunk(name: str, weights: str | None, *, seed: int = 0, in_features: int | None = None) -> Trunk:
    """Build the frozen trunk ``name`` with weights from a file, a cached torchvision name, or a seed.

    Parameters
    ----------
    name
        ``resnet18``, ``resnet34``, ``resnet50``, or ``none`` (identity on (B, in_features)).
    weights
        ``None`` (random, seeded), a path to a state dict or checkpoint, or a torchvision weights
        name such as ``ResNet18_Weights.IMAGENET1K_V1`` that is already in the torch hub cache.
    seed
        Seeds the random initialisation; the caller's global RNG state is left untouched.
    in_features
        Required for ``none``; for a ResNet it must be omitted or equal its width.

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
    if name not in RESNETS:
        raise ConfigError(f"trunk must be one of {[*sorted(RESNETS), 'none']}, got {name!r}")
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


def _weights_enum_name(name: str) -> str:
    return "ResNet" + name.removeprefix("resnet") + "_Weights"


def _resolve_weights(name: str, weights: str) -> Path:
    """The file to load: ``weights`` itself, or a torchvision weights name's file in the hub cache."""
    path = Path(weights).expanduser()
    if path.is_file() or not _WEIGHTS_NAME.match(weights):
        if not path.exists():
            raise TrunkWeightsError(f"trunk weights file not found: {path}")
        if not path.is_file():
            raise TrunkWeightsError(f"trunk weights path is not a file: {path}")
        return path
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


def _load_into(body: nn.Module, name: str, path: Path) -> None:
    """Load a state dict or checkpoint file into ``body`` exactly, or raise ``TrunkWeightsError``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise TrunkWeightsError(
            f"cannot read trunk weights file {path}: {type(err).__name__}: {str(err)[:200]}; "
            "it must be a torch.save'd state dict of tensors"
        ) from err
    state = _find_state_dict(obj, path)
    target = body.state_dict()
    prefix = max(KNOWN_PREFIXES, key=lambda p: sum(k[len(p) :] in target for k in state if k.startswith(p)))
    # Keys outside the chosen prefix belong to other parts (projector, predictor, MoCo's key encoder).
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    picked = {k: v for k, v in picked.items() if not k.startswith("fc.")}  # classifier or SimSiam projector
    ignored = len(state) - len(picked)
    # Checkpoints from before BatchNorm counted its batches lack these; they are unused in eval mode.
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
    body.load_state_dict(picked, strict=True)
    log.debug("weights %s: prefix %r, %d tensors, %d other keys ignored", path, prefix, len(picked), ignored)


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
