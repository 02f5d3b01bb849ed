"""An adapter naming modules the base does not have: exit 1 naming the module, nothing at --out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from rslora_deploy.cli.app import main

pytestmark = pytest.mark.slow


def _peft_lora(directory: Path, module: str, d_in: int, d_out: int) -> Path:
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"],
        "fan_in_fan_out": False, "use_rslora": False, "bias": "none",
    }))  # fmt: skip
    rng = np.random.default_rng(0)
    save_file({
        f"base_model.model.{module}.lora_A.weight": rng.standard_normal((2, d_in), np.float32),
        f"base_model.model.{module}.lora_B.weight": rng.standard_normal((d_out, 2), np.float32),
    }, str(directory / "adapter_model.safetensors"))  # fmt: skip
    return directory


def test_adapter_module_missing_from_base(
    tmp_path: Path, smollm2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = _peft_lora(tmp_path / "adapter", "model.layers.99.self_attn.q_proj", 576, 576)
    out = tmp_path / "pkg"
    code = main(["build", "--profile", "t4-2gb", "--adapter", str(adapter), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    error_lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(error_lines) == 1
    assert "Traceback" not in err
    assert "E020" in error_lines[0]
    assert "model.layers.99.self_attn.q_proj" in error_lines[0]
    assert not out.exists()
    assert not list(tmp_path.glob(".pkg*"))


def test_adapter_shape_mismatch(
    tmp_path: Path, smollm2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = _peft_lora(tmp_path / "adapter", "model.layers.0.self_attn.q_proj", 512, 576)
    out = tmp_path / "pkg"
    code = main(["build", "--profile", "t4-2gb", "--adapter", str(adapter), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "E022" in err
    assert "model.layers.0.self_attn.q_proj" in err
    assert not out.exists()
    assert not list(tmp_path.glob(".pkg*"))
