"""CLI: rslora-deploy quantize / eval. Bad input exits 1 with one line and leaves no --out."""

from __future__ import annotations

import json

import pytest

from rslora_deploy.cli.app import main
from tests import tolerances as tol
from tests.unit.cli.clean_failure import assert_failed_cleanly


def run(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_quantize_rtn_ok(capsys, tiny_dir, tmp_path):
    out = tmp_path / "q"
    code, stdout, err = run(
        capsys,
        "quantize",
        "--model",
        str(tiny_dir),
        "--out",
        str(out),
        "--method",
        "rtn",
        "--format",
        "json",
    )
    assert code == 0, err
    meta = json.loads(stdout)
    assert meta["method"] == "rtn"
    assert meta["group_size"] == 64
    assert (out / "config.json").is_file()
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--bits", "3"], "bits must be 4 or 8"),
        (["--group-size", "256"], "group_size=256 does not divide the input width of layer"),
        (["--group-size", "48"], "group_size must be -1 or a power of two"),
        (["--method", "awq", "--bits", "8"], "not supported by method awq"),
        (["--method", "awq", "--compute-dtype", "float32"], "not supported by method awq"),
        (["--mse", "-1"], "mse"),
    ],
)
def test_quantize_bad_options(capsys, tiny_dir, tmp_path, args, needle):
    out = tmp_path / "q"
    code, _, err = run(
        capsys, "quantize", "--model", str(tiny_dir), "--out", str(out), "--method", "rtn", *args
    )
    assert_failed_cleanly(code, err, out, needle, only_line=True)


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("c.txt", b"", "contains no text"),
        ("c.txt", b"short text only", "sequences of 64 tokens but 2 are needed"),
        ("c.txt", "na\u00efve".encode("latin-1") * 50, "is not UTF-8"),
        ("c.jsonl", b"plain text, not json\n", "line 1 is not JSON"),
        ("c.docx", b"PK\x03\x04", "use a .txt file"),
    ],
)
def test_quantize_bad_calibration(capsys, tiny_dir, tmp_path, name, content, needle):
    calib = tmp_path / name
    calib.write_bytes(content)
    out = tmp_path / "q"
    code, _, err = run(
        capsys,
        "quantize",
        "--model",
        str(tiny_dir),
        "--out",
        str(out),
        "--method",
        "gptq",
        "--calib",
        str(calib),
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "64",
    )
    assert_failed_cleanly(code, err, out, needle, only_line=True)


def test_quantize_out_not_empty(capsys, tiny_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep").write_text("x")
    code, _, err = run(
        capsys, "quantize", "--model", str(tiny_dir), "--out", str(out), "--method", "rtn"
    )
    assert code == 1
    assert "not empty" in err
    assert (out / "keep").read_text() == "x"


def test_protect_adapter_needs_base(capsys, tiny_dir, tmp_path):
    out = tmp_path / "q"
    code, _, err = run(
        capsys,
        "quantize",
        "--model",
        str(tiny_dir),
        "--out",
        str(out),
        "--method",
        "rtn",
        "--protect-adapter",
    )
    assert_failed_cleanly(code, err, out, "--protect-adapter needs --base", only_line=True)


def test_eval_quantized_vs_merged(capsys, tiny_dir, rtn_dir, tmp_path):
    report = tmp_path / "quality.json"
    code, _, err = run(
        capsys,
        "eval",
        "--model",
        str(tiny_dir),
        "--quantized",
        str(rtn_dir),
        "--base",
        str(tiny_dir),
        "--windows",
        "2",
        "--window-len",
        "32",
        "--out",
        str(report),
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["protocol"]["scored_tokens"] == 2 * 31
    assert data["models"]["merged"]["greedy_agreement"] == 1.0
    assert 0 < data["models"]["quantized"]["greedy_agreement"] <= 1
    # base == merged here: no adapter effect, so nothing to retain.
    assert data["survival"]["effect_kl_merged_vs_base"] == pytest.approx(0, abs=tol.F64_IDENTITY)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, rtn_dir):
    """The tiny RTN checkpoint exported for t4-2gb, viewed for the CPU (a genai folder)."""
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.exporters.genai.builder import cpu_view, export_onnx
    from rslora_deploy.exporters.genai.options import GenaiExportConfig
    from rslora_deploy.profiles import load_profile

    root = tmp_path_factory.mktemp("onnx")
    art = export_onnx(
        Artifact("hf-quantized", rtn_dir),
        root / "model",
        GenaiExportConfig(),
        load_profile("t4-2gb"),
        root / "export.log",
    )
    return cpu_view(art.path, root / "cpu")


def test_eval_onnx_against_source_without_quantized(capsys, tiny_dir, tiny_onnx, tmp_path):
    """Any ONNX folder against its source model: no --quantized needed (issue 12)."""
    report = tmp_path / "quality.json"
    code, out, err = run(
        capsys,
        "eval",
        "--model",
        str(tiny_dir),
        "--onnx",
        str(tiny_onnx),
        "--base",
        str(tiny_dir),
        "--windows",
        "2",
        "--window-len",
        "32",
        "--out",
        str(report),
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    assert set(data["models"]) == {"merged", "base", "onnx"}
    assert 0 < data["models"]["onnx"]["greedy_agreement"] <= 1
    # int4 weights: the ONNX model differs from its fp32 source, but not wildly.
    assert 0 < data["relative_logit_error"]["onnx_vs_merged"] < 0.5
    assert "onnx_vs_torch_ok" not in data  # no PyTorch quantized model to gate against
    assert data["survival"]["quantized_model"] == "onnx"
    assert "relative logit error onnx_vs_merged" in out


def test_eval_base_alone_is_refused(capsys, tiny_dir, tmp_path):
    code, _, err = run(capsys, "eval", "--model", str(tiny_dir), "--base", str(tiny_dir))
    assert code == 1
    assert "--base adds adapter survival" in err
