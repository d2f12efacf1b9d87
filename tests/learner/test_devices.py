"""The device paths: the bfloat16 trunk (CUDA's default, run here on the CPU too) and, with
``@pytest.mark.gpu``, the learner on CUDA against the CPU (skipped where CUDA is not available)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from learner import ModelConfig, RFPLearner
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.errors import ArchitectureMismatch
from learner.model import RJEPA
from learner.patches import preprocess

SMALL = dict(n_units=24, embed_dim=8, pred_hidden=16, input_size=32)


def patches(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_bfloat16_trunk_gives_float32_features_close_to_the_float32_trunk() -> None:
    cfg = ModelConfig(**SMALL)
    ref = RJEPA(cfg).to_device(torch.device("cpu"), torch.float32)
    bf16 = RJEPA(cfg).to_device(torch.device("cpu"), torch.float32, trunk_dtype=torch.bfloat16)
    assert bf16.trunk_dtype == torch.bfloat16 and next(bf16.trunk.parameters()).dtype == torch.bfloat16
    assert bf16.rgc.W.dtype == torch.float32  # only the trunk
    x = preprocess(list(patches(4)), 32, device=torch.device("cpu"), dtype=torch.float32)
    u_ref, u = ref.encode(x), bf16.encode(x)
    assert u.dtype == torch.float32 and u.shape == u_ref.shape
    assert float((u - u_ref).norm() / u_ref.norm()) < 0.05  # bfloat16 has 8 bits of mantissa


def test_default_trunk_dtype_follows_the_device() -> None:
    """Off CUDA the trunk runs in the model's dtype: its weights are cast, not only the attribute set."""
    model = RJEPA(ModelConfig(**SMALL)).to_device(torch.device("cpu"), torch.float64)
    assert model.trunk_dtype == torch.float64
    floats = [t for t in (*model.trunk.parameters(), *model.trunk.buffers()) if t.is_floating_point()]
    assert floats and {t.dtype for t in floats} == {torch.float64}
    x = preprocess(list(patches(2)), 32, device=torch.device("cpu"), dtype=torch.float64)
    assert model.encode(x).dtype == torch.float64


def _segment_learner(device: str, dtype: torch.dtype) -> RFPLearner:
    cfg = ModelConfig(trunk="none", in_features=10, n_units=12, embed_dim=6, pred_hidden=9, lr=0.0,
                      init_scale=0.5, update_mode="segment", segment_len=1000, seed=4)  # fmt: skip
    return RFPLearner(cfg, device=device, dtype=dtype)


@pytest.mark.gpu
def test_cuda_rfp_gradients_match_the_cpu_float64_ones() -> None:
    feats = torch.randn(25, 3, 10, generator=torch.Generator().manual_seed(2))
    runs = {}
    for device, dtype in (("cpu", torch.float64), ("cuda", torch.float32)):
        learner = _segment_learner(device, dtype)
        assert learner.batched_traces == (device == "cuda")
        for x in feats:  # lr 0: weights fixed, gradients summed over the segment
            learner.tick_features(["a", "b", "c"], x.to(device))
        runs[device] = {k: v.double().cpu() for k, v in learner.grads().items()}
    for name, ref in runs["cpu"].items():
        got = runs["cuda"][name]
        scale = float(ref.abs().max()) or 1.0
        assert float((got - ref).abs().max()) / scale < 1e-4, name


@pytest.mark.gpu
def test_cuda_learner_ticks_patches_and_checkpoints_to_cpu(tmp_path: Path) -> None:
    cfg = ModelConfig(**SMALL)
    gpu = RFPLearner(cfg, device="cuda")
    assert gpu.model.trunk_dtype == torch.bfloat16
    for t in range(4):
        out = gpu.tick(["a", "b"], patches(2, seed=t))
    assert out.updated and bool(torch.isfinite(out.error).all()) and out.step.tolist() == [4, 4]
    path = tmp_path / "gpu.ckpt"
    save_checkpoint(path, gpu)
    cpu = RFPLearner(cfg, device="cpu")
    load_checkpoint(path, cpu)
    assert cpu.updates_applied == gpu.updates_applied
    torch.testing.assert_close(
        cpu.states.h[cpu.states.slots(["a"])], gpu.states.h[gpu.states.slots(["a"])].cpu()
    )
    assert cpu.tick(["a"], patches(1, seed=9)).step.tolist() == [5]


def test_a_checkpoint_of_a_bfloat16_trunk_loads_into_a_float32_one(tmp_path: Path) -> None:
    """What a GPU checkpoint meets on a CPU: same trunk weights, other precision. Not a mismatch."""
    cfg = ModelConfig(**SMALL)
    writer = RFPLearner(cfg)
    writer.model.to_device(torch.device("cpu"), torch.float32, trunk_dtype=torch.bfloat16)
    writer.tick(["a"], patches(1))
    save_checkpoint(tmp_path / "bf16.ckpt", writer)
    reader = RFPLearner(cfg)
    load_checkpoint(tmp_path / "bf16.ckpt", reader)
    assert reader.stream_ids() == ["a"]
    other = RFPLearner(cfg.replace(trunk_weights="random"))  # other trunk weights: still refused
    with pytest.raises(ArchitectureMismatch, match="other trunk weights"):
        load_checkpoint(tmp_path / "bf16.ckpt", other)
