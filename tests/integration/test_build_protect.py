"""``build --protect-adapter`` on the real model: the demo adapter's fragile modules ship at 8 bits.

RTN keeps it inside CI time (the protection logic is the same for every quantizer) and the Ascend
profile gives a CPU-target graph with fp32 activations, so the ONNX logits can be held to an exact
dequantization of the mixed 4/8-bit checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rslora_deploy.cli.app import main
from rslora_deploy.stages.package import verify_manifest
from tests import tolerances as tol

pytestmark = pytest.mark.slow

RECIPE = """
[quantize]
method = "rtn"
group_size = 64
[export]
# fp32 activations and a full-precision lm_head, so the ONNX logits can equal an exact
# dequantization (the CPU default, level 4 with an int4 lm_head, is measured in docs/export.md).
accuracy_level = 1
lm_head = "fp32"
[eval]
windows = 2
window_len = 256
survival_threshold = 0.999
[package]
keep_quantized_checkpoint = true
"""


@pytest.fixture(scope="module")
def package(
    tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, build_package: Any
) -> Path:
    root = tmp_path_factory.mktemp("protect")
    # A genai CPU-target profile: the Ascend profiles now ship fp16 through ascend-om, which has
    # no 8-bit rewrite to check.
    return build_package(root, RECIPE, "cpu-2gb", "--protect-adapter")


def test_protection_is_reported_with_its_size(package: Path) -> None:
    manifest = json.loads((package / "manifest.json").read_text())
    protection = manifest["quantization"]["protection"]
    assert protection["modules"] > 0
    assert protection["extra_bytes"] > 0
    rewritten = manifest["export"]["protected_8bit"]
    assert rewritten["protected_modules"] == protection["modules"]
    assert rewritten["bytes_after"] > rewritten["bytes_before"]
    assert "--protect-adapter" in (package / "README.md").read_text()
    assert verify_manifest(package) == []


def test_onnx_matches_the_mixed_checkpoint(package: Path) -> None:
    quality = json.loads((package / "reports" / "quality.json").read_text())
    assert quality["relative_logit_error"]["onnx_vs_quantized"] < tol.ONNX_VS_TORCH_PROTECTED
    assert "retained" in quality["survival"]
    assert quality["survival"]["quantized_model"] == "onnx"
    # The recipe's threshold (0.999) overrides the profile's 0.5: protected RTN keeps ~0.98.
    assert quality["survival"]["threshold"] == 0.999
    manifest = json.loads((package / "manifest.json").read_text())
    assert "raise quantize.protect_ratio" in manifest["quality"]["adapter_survival_warning"]


def test_protect_without_adapter_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pkg"
    argv = ["build", "--profile", "t4-2gb", "--no-adapter", "--protect-adapter", "--no-eval"]
    code = main([*argv, "--out", str(out)])
    assert code == 1
    assert "merges no adapter" in capsys.readouterr().err
    assert not out.exists()


def test_mixed_checkpoint_from_elsewhere_builds(package: Path, tmp_path: Path) -> None:
    """The kept mixed 4/8-bit checkpoint as ``--base``: checked as already quantized (8-bit
    layers against 8 bits), passed through, exported with the same 8-bit nodes."""
    out, recipe = tmp_path / "again", tmp_path / "export.toml"
    recipe.write_text('[export]\naccuracy_level = 1\nlm_head = "fp32"\n')  # the first build's
    argv = ["build", "--profile", "cpu-2gb", "--base", str(package / "quantized")]
    argv += ["--recipe", str(recipe)]
    assert main([*argv, "--no-adapter", "--no-eval", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["prequantized"] is True
    first = json.loads((package / "manifest.json").read_text())["export"]["protected_8bit"]
    assert manifest["export"]["protected_8bit"]["nodes"] == first["nodes"]
