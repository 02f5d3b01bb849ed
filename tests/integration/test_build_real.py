"""The walking skeleton end to end: ``rslora-deploy build --profile t4-2gb`` on the real model.

One build (module fixture) with a small calibration set so it fits CI's time; the assertions are the
issue's contract: exit 0, a package whose manifest hashes match its files, a budget verdict, an
ONNX model that generates coherent English and whose logits match the PyTorch quantized model.
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
def package(
    tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, build_package: Any
) -> Path:
    return build_package(tmp_path_factory.mktemp("build"), RECIPE, "t4-2gb")


def test_package_layout_and_manifest(package: Path) -> None:
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["tool"]["name"] == "rslora-deploy"
    assert manifest["profile"]["name"] == "t4-2gb"
    for key in ("fits", "budget_bytes", "estimate_bytes"):
        assert key in manifest["budget"]
    paths = {entry["path"] for entry in manifest["files"]}
    assert {
        "model/model.onnx",
        "model/genai_config.json",
        "reports/budget.json",
        "README.md",
    } <= paths
    assert manifest["inputs"]["base"]["sha256"]["model.safetensors"]
    assert verify_manifest(package) == []
    assert not list(package.parent.glob(".pkg.partial-*"))


def test_budget_fits_and_covers_measured_weights(package: Path) -> None:
    budget = json.loads((package / "reports" / "budget.json").read_text())
    weights = sum(p.stat().st_size for p in (package / "model").glob("model.onnx*"))
    assert budget["terms_bytes"]["weights"] == weights
    assert budget["estimate_bytes"] >= weights + budget["terms_bytes"]["kv_cache"]
    assert budget["fits"] is True
    assert budget["inputs"]["logits_positions"] == "last"
    assert budget["terms_bytes"]["logits"] == 49152 * 2  # vocab x fp16, one position
    # t4-2gb's device is an NVIDIA GPU: on a machine without one nothing is made up.
    measured = json.loads((package / "reports" / "budget.measured.json").read_text())
    if measured["status"] == "not measured":
        assert "cuda" in measured["reason"]
        assert "probes_bytes" not in measured
    assert budget["measured"]["status"] == measured["status"]
    assert (package / "reports" / "budget.html").is_file()
    genai = json.loads((package / "model" / "genai_config.json").read_text())
    assert genai["search"]["max_length"] == 2048  # the profile's max_seq_len, as budgeted


def test_cpu_package_estimate_within_10_percent_of_the_worst_case(
    package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue #9: the same GPTQ checkpoint exported for cpu-2gb and packaged; the worst case
    (prompt of max_length - 16 tokens, decode to max_length) measured as the child's peak RSS at
    max_length 2048 (the package's own) and 512. The estimate must cover it, within 10%."""
    onnx_dir, out = tmp_path / "onnx", tmp_path / "cpu"
    argv = ["export", "--model", str(package / "quantized"), "--profile", "cpu-2gb"]
    assert main([*argv, "--out", str(onnx_dir)]) == 0
    assert (
        main(["package", "--model", str(onnx_dir), "--profile", "cpu-2gb", "--out", str(out)]) == 0
    )
    assert verify_manifest(out) == []
    measured = json.loads((out / "reports" / "budget.measured.json").read_text())
    assert measured["status"] == "measured"
    assert measured["max_length"] == 2048
    ratios = {2048: measured["versus_estimate"]["estimate_over_measured"]}
    capsys.readouterr()
    code = main(["budget", str(out), "--profile", "cpu-2gb", "--max-length", "512", "--measure",
                 "--format", "json"])  # fmt: skip
    assert code == 0
    row = json.loads(capsys.readouterr().out)
    ratios[512] = (
        row["estimate"]["estimate_bytes"] / row["measured"]["probes_bytes"]["worst_case_peak"]
    )
    assert verify_manifest(out) == []  # the new reports were recorded in the manifest
    for length, ratio in ratios.items():
        assert 1.0 <= ratio <= 1.10, (length, ratios)


def test_generates_coherent_english(package: Path) -> None:
    manifest = json.loads((package / "manifest.json").read_text())
    text = manifest["smoke_test"]["text"]
    assert text.startswith("The capital of France is")
    assert "Paris" in text


def test_onnx_logits_match_torch_quantized(package: Path) -> None:
    from rslora_deploy.evaluation.quality import relative_logit_error
    from rslora_deploy.exporters.genai.builder import cpu_view

    view = cpu_view(package / "model", package.parent / "cpu_view")
    error = relative_logit_error(view, package / "quantized")
    assert error < tol.ONNX_VS_TORCH


def test_dry_prediction_matches_exported_weights(package: Path, smollm2_dir: Path) -> None:
    from rslora_deploy.model_view import model_view
    from rslora_deploy.profiles import load_profile
    from rslora_deploy.stages.budget import predict_weight_bytes

    budget = json.loads((package / "reports" / "budget.json").read_text())
    predicted = sum(
        predict_weight_bytes(model_view(smollm2_dir), 4, 64, load_profile("t4-2gb")).values()
    )
    measured = budget["terms_bytes"]["weights"]
    assert abs(predicted - measured) / measured < tol.BUDGET_PREDICTION


def test_verify_command_rehashes(package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(package), "--no-generate"]) == 0
    (package / "README.md").write_text("tampered")
    assert main(["verify", str(package), "--no-generate"]) == 1
    assert "content differs" in capsys.readouterr().err
