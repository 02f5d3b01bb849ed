"""A multi-module PEFT DoRA adapter over the real SmolLM2-135M through ``build``.

The adapter is made by PEFT itself (``use_dora=True`` on q/v/down projections), its factors and
magnitudes moved off their initial values; the build must merge it (not refuse it, not drop the
magnitude): ``reports/merge_report.json`` names every targeted module with the range of
m / ||W + dW||, which must equal the range computed from PEFT's own tensors, and the package must
pass verify (the build's smoke test generates from the shipped model).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rslora_deploy.cli.app import main

pytestmark = pytest.mark.slow

peft = pytest.importorskip("peft")


def _dora_adapter(base_dir: Path, directory: Path) -> dict[str, tuple[float, float]]:
    """Write a PEFT DoRA adapter for ``base_dir``; return each module's expected factor range."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    wrapped = peft.get_peft_model(base, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * (2 * torch.rand(param.shape, generator=gen) - 1))
            elif "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    wrapped.save_pretrained(directory)
    expected = {}
    for name, module in wrapped.named_modules():
        if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
            weight = module.get_base_layer().weight.detach().double()
            delta = module.get_delta_weight("default").detach().double()
            norm = torch.linalg.vector_norm(weight + delta, dim=1)
            factor = module.lora_magnitude_vector["default"].weight.detach().double() / norm
            expected[name.removeprefix("base_model.model.")] = (
                float(factor.min()),
                float(factor.max()),
            )
    return expected


def test_dora_adapter_builds_with_its_magnitudes(tmp_path: Path, smollm2_dir: Path) -> None:
    expected = _dora_adapter(smollm2_dir, tmp_path / "adapter")
    assert len(expected) == 3 * 30  # q, v, down in each of SmolLM2's 30 layers
    out = tmp_path / "pkg"
    argv = ["build", "--profile", "cpu-2gb", "--adapter", str(tmp_path / "adapter")]
    assert main([*argv, "--method", "rtn", "--no-eval", "--out", str(out)]) == 0
    report = json.loads((out / "reports" / "merge_report.json").read_text())
    rows = {row["module"]: row for row in report["modules"]}
    assert set(rows) == set(expected)
    for module, (low, high) in expected.items():
        got_low, got_high = rows[module]["magnitude_factor"]
        assert got_low == pytest.approx(low, rel=1e-5), module
        assert got_high == pytest.approx(high, rel=1e-5), module
    assert (out / "manifest.json").is_file()
