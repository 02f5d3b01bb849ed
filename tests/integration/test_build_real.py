"""The walking skeleton end to end: ``rslora-deploy build --profile t4-2gb`` on the real model.

One build (module fixture) with a small calibration set so it fits CI's time; the assertions are the
issue's contract: exit 0, a package whose manifest hashes match its files, a budget verdict, an
ONNX model that generates coherent English and whose logits match the PyTorch quantized model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rslora_deploy.cli.app import main
from rslora_deploy.stages.package import verify_manifest

pytestmark = pytest.mark.slow

RECIPE = """
profile = "t4-2gb"
[quantize]
method = "gptq"
group_size = 64
calib_samples = 8
calib_seq_len = 128
[eval]
windows = 4
window_len = 256
[package]
keep_quantized_checkpoint = true
"""


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("build")
    recipe = root / "recipe.toml"
    recipe.write_text(RECIPE)
    out = root / "pkg"
    code = main(["build", "--profile", "t4-2gb", "--recipe", str(recipe), "--out", str(out)])
    assert code == 0
    return out


def test_package_layout_and_manifest(package: Path) -> None:
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["tool"]["name"] == "rslora-deploy"
    assert manifest["profile"]["name"] == "t4-2gb"
    for key in ("fits", "budget_bytes", "estimate_bytes"):
        assert key in manifest["budget"]
    paths = {entry["path"] for entry in manifest["files"]}
    assert {"model/model.onnx", "model/genai_config.json", "reports/budget.json",
            "README.md"} <= paths
    assert manifest["inputs"]["base"]["sha256"]["model.safetensors"]
    assert verify_manifest(package) == []
    assert not list(package.parent.glob(".pkg.partial-*"))


def test_budget_fits_and_covers_measured_weights(package: Path) -> None:
    budget = json.loads((package / "reports" / "budget.json").read_text())
    weights = sum(p.stat().st_size for p in (package / "model").glob("model.onnx*"))
    assert budget["terms_bytes"]["weights"] == weights
    assert budget["estimate_bytes"] >= weights + budget["terms_bytes"]["kv_cache"]
    assert budget["fits"] is True
    # The CPU run's peak RSS (model + 2048-token KV cache + arena) stays under the estimate.
    assert budget["measured_cpu"]["peak_rss_bytes"] < budget["estimate_bytes"]


def test_generates_coherent_english(package: Path) -> None:
    manifest = json.loads((package / "manifest.json").read_text())
    text = manifest["smoke_test"]["text"]
    assert text.startswith("The capital of France is")
    assert "Paris" in text


def test_onnx_logits_match_torch_quantized(package: Path) -> None:
    from rslora_deploy.evaluation import relative_logit_error
    from rslora_deploy.stages.export_onnx import cpu_view

    view = cpu_view(package / "model", package.parent / "cpu_view")
    error = relative_logit_error(view, package / "quantized")
    assert error < 0.02


def test_dry_prediction_matches_exported_weights(package: Path, smollm2_dir: Path) -> None:
    from rslora_deploy.model_view import model_view
    from rslora_deploy.profiles import load_profile
    from rslora_deploy.stages.budget import predict_weight_bytes

    budget = json.loads((package / "reports" / "budget.json").read_text())
    predicted = sum(predict_weight_bytes(model_view(smollm2_dir), 4, 64,
                                         load_profile("t4-2gb")).values())
    measured = budget["terms_bytes"]["weights"]
    assert abs(predicted - measured) / measured < 0.02


def test_verify_command_rehashes(package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(package), "--no-generate"]) == 0
    (package / "README.md").write_text("tampered")
    assert main(["verify", str(package), "--no-generate"]) == 1
    assert "content differs" in capsys.readouterr().err
