"""Bad input to ``rslora-deploy build``: exit 1, one line naming the problem, nothing at --out."""

from __future__ import annotations

from pathlib import Path

import pytest

from rslora_deploy.cli.app import main
from tests.unit.cli.clean_failure import assert_failed_cleanly


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_unknown_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pkg"
    code, err = _run(["build", "--profile", "jetson-9gb", "--out", str(out)], capsys)
    assert_failed_cleanly(code, err, out, "jetson-9gb", "known profiles")


def test_missing_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pkg"
    missing = tmp_path / "no-such-model"
    code, err = _run(
        ["build", "--profile", "t4-2gb", "--base", str(missing), "--out", str(out)], capsys
    )
    assert_failed_cleanly(code, err, out, str(missing), "does not exist")


def test_base_with_only_pickle_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    out = tmp_path / "pkg"
    code, err = _run(
        ["build", "--profile", "t4-2gb", "--base", str(base), "--out", str(out)], capsys
    )
    assert_failed_cleanly(code, err, out, "pytorch_model.bin", "pickle")


def test_base_file_not_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "model.txt"
    base.write_text("hello")
    out = tmp_path / "pkg"
    code, err = _run(
        ["build", "--profile", "t4-2gb", "--base", str(base), "--out", str(out)], capsys
    )
    assert_failed_cleanly(code, err, out, "not a .gguf")


def test_unreadable_base_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"")
    (base / "config.json").write_text("{not json")
    out = tmp_path / "pkg"
    code, err = _run(
        ["build", "--profile", "t4-2gb", "--base", str(base), "--out", str(out)], capsys
    )
    assert_failed_cleanly(code, err, out, "config.json", "not valid JSON")


def test_missing_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_dir: Path
) -> None:
    out = tmp_path / "pkg"
    adapter = tmp_path / "no-adapter"
    code, err = _run(
        ["build", "--profile", "t4-2gb", "--base", str(tiny_dir), "--adapter", str(adapter),
         "--out", str(out)],
        capsys,
    )  # fmt: skip
    assert_failed_cleanly(code, err, out, str(adapter), "does not exist")


def test_adapter_dir_without_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_dir: Path
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "notes.txt").write_text("x")
    out = tmp_path / "pkg"
    code, err = _run(
        ["build", "--profile", "t4-2gb", "--base", str(tiny_dir), "--adapter", str(adapter),
         "--out", str(out)],
        capsys,
    )  # fmt: skip
    assert_failed_cleanly(code, err, out, "rslora_config.json", "adapter_config.json")


def test_existing_out_is_not_touched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_dir: Path
) -> None:
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, err = _run(
        [
            "build",
            "--profile",
            "t4-2gb",
            "--base",
            str(tiny_dir),
            "--no-adapter",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 1
    assert "--overwrite" in err
    assert (out / "mine.txt").read_text() == "keep"


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build"]) == 2
    assert main(["build", "--profile", "t4-2gb", "--method", "gptq", "--no-such-flag"]) == 2


def test_debug_env_shows_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RSLORA_DEPLOY_DEBUG", "1")
    code, err = _run(["build", "--profile", "nope", "--out", str(tmp_path / "o")], capsys)
    assert code == 1
    assert "Traceback" in err


def test_package_needs_an_onnx_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pkg"
    code, err = _run(
        ["package", "--model", str(tmp_path), "--profile", "t4-2gb", "--out", str(out)], capsys
    )
    assert_failed_cleanly(code, err, out, "genai_config.json")


def test_budget_on_a_non_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(["budget", str(tmp_path), "--profile", "t4-2gb"], capsys)
    assert code == 1
    assert "neither a package" in err


def test_verify_without_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(["verify", str(tmp_path)], capsys)
    assert code == 1
    assert "manifest.json" in err


def test_lm_head_precision_the_target_cannot_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """t4-2gb's graph has fp16 activations: an fp32 lm_head is refused before anything runs."""
    profile, precision = "t4-2gb", "fp32"
    out = tmp_path / "pkg"
    code, err = _run(
        ["build", "--profile", profile, "--lm-head", precision, "--out", str(out)], capsys
    )
    assert_failed_cleanly(code, err, out, f"export.lm_head={precision}", profile, "int4")


def test_group_size_that_divides_no_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_dir: Path
) -> None:
    """The tiny model's 128-wide layers: 256 does not divide them; 32, 64 and 128 divide all."""
    out = tmp_path / "pkg"
    code, err = _run(
        ["build", "--profile", "t4-2gb", "--base", str(tiny_dir), "--no-adapter", "--method",
         "rtn", "--group-size", "256", "--no-eval", "--out", str(out)],
        capsys,
    )  # fmt: skip
    assert_failed_cleanly(code, err, out, "group_size=256", "(128)", "32, 64, 128")
