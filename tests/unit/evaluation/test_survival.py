"""Survival arithmetic on small logit matrices and on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rslora_deploy.evaluation import survival
from rslora_deploy.exporters.genai.fused import FUSED_GROUPS
from rslora_deploy.quantizers import protection
from tests import tolerances as tol


def _logits(seed: int, shape=(6, 11)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape) * 2


def test_retained_endpoints():
    base, merged = _logits(4), _logits(5)
    for quant, expected in ((merged, 1.0), (base, 0.0)):
        stats = survival.SurvivalStats()
        stats.add(base, merged, quant)
        out = stats.summary(threshold=0.5)
        assert out["retained"] == pytest.approx(expected, abs=tol.F64_IDENTITY)
        assert out["retained_kl"] == pytest.approx(expected, abs=tol.F64_IDENTITY)
        assert out["warning"] is (expected < 0.5)


def test_projection_half_way():
    base, merged = _logits(6), _logits(7)
    assert survival.retained_projection(base, merged, (base + merged) / 2) == pytest.approx(0.5)


def test_retained_fraction_no_effect_is_nan():
    assert math.isnan(survival.retained_fraction(0.0, 0.1))
    assert survival.retained_fraction(2.0, 0.5) == pytest.approx(0.75)


def test_loss_view_and_warning_logged(caplog):
    base, merged = _logits(8), _logits(9)
    targets = np.array([0, 1, 2, 3, 4, 5])
    stats = survival.SurvivalStats()
    stats.add(base, merged, base, targets=targets)
    out = stats.summary(threshold=0.9)
    assert out["retained_loss"] == pytest.approx(0.0, abs=tol.F64_IDENTITY)
    assert out["warning"]
    assert "protect-adapter" in caplog.text


def test_tiny_models_survival(tmp_path):
    """B, M = B + small delta on one module, Q = RTN(M): retained is finite and <= 1."""
    import torch
    from safetensors.numpy import load_file, save_file
    from transformers import AutoModelForCausalLM

    from rslora_deploy.artifact import Artifact
    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.stages.quantize import quantize_model
    from rslora_deploy.testing.tiny import example_inputs, tiny_llama_dir
    from rslora_deploy.testing.tokenizer import TINY_VOCAB

    base = tiny_llama_dir(tmp_path / "b", seed=3)
    merged = tiny_llama_dir(tmp_path / "m", seed=3)
    tensors = load_file(str(merged / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    rng = np.random.default_rng(0)
    tensors[key] = tensors[key] + (rng.standard_normal(tensors[key].shape) * 0.05).astype(
        np.float32
    )
    save_file(tensors, str(merged / "model.safetensors"), metadata={"format": "pt"})
    quant = quantize_model(
        Artifact("hf", merged), tmp_path / "q", QuantizeConfig(method="rtn")
    ).path

    ratios = protection.delta_to_step_ratios(base, merged, 4, 64, True)
    assert list(ratios) == ["model.layers.0.mlp.up_proj"]
    dyn = protection.protection_dynamic(ratios, FUSED_GROUPS, max_ratio=100.0)
    # up_proj changed; gate_proj joins it because the genai builder fuses the two.
    assert dyn == {
        r"+:^model\.layers\.0\.mlp\.gate_proj$": {"bits": 8},
        r"+:^model\.layers\.0\.mlp\.up_proj$": {"bits": 8},
    }
    assert protection.protection_dynamic(ratios, FUSED_GROUPS, max_ratio=1e-9) == {}

    ids = example_inputs(vocab=TINY_VOCAB, batch=1, seq=24)
    logits = {}
    for name, path in (("b", base), ("m", merged), ("q", quant)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits[name] = model(ids).logits[0].numpy()
    stats = survival.SurvivalStats()
    stats.add(logits["b"], logits["m"], logits["q"])
    out = stats.summary()
    assert out["effect_kl_merged_vs_base"] > 0
    assert out["retained_kl"] <= 1.0  # KL(M||Q) >= 0
    # A 4-bit quantization of a 2-layer model keeps most of a 0.05-std delta's direction.
    assert 0.5 < out["retained"] < 1.5
